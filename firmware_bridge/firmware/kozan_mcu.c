/*
 * Kozan diverter MCU protocol core. See kozan_mcu.h for the contract and PROTOCOL.md for the rules;
 * firmware_bridge/simulator.py is the behavioural reference this file follows rule for rule (the
 * conformance suite, tests/firmware_bridge/test_conformance.py, runs the same tests against both).
 */
#include "kozan_mcu.h"

#include <string.h>

/* ------------------------------------------------------------------ little-endian helpers */
static void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static void put_u64(uint8_t *p, uint64_t v) { put_u32(p, (uint32_t)v); put_u32(p + 4, (uint32_t)(v >> 32)); }
static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t get_u64(const uint8_t *p) { return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32); }

/* ------------------------------------------------------------------ checksums */
uint16_t kz_crc16_ccitt_false(const uint8_t *data, size_t len) {
    uint16_t crc = 0xFFFFu;
    size_t i;
    int b;
    for (i = 0; i < len; i++) {
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (b = 0; b < 8; b++) crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u) : (uint16_t)(crc << 1);
    }
    return crc;
}

uint32_t kz_crc32(const uint8_t *data, size_t len) { /* zlib's CRC-32; bitwise: only Configure uses it */
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    int b;
    for (i = 0; i < len; i++) {
        crc ^= data[i];
        for (b = 0; b < 8; b++) crc = (crc & 1u) ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
    }
    return crc ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------------ transmit */
static void send_frame(kz_mcu_t *m, uint8_t msg_type, const uint8_t *payload, uint8_t len) {
    uint8_t body[KZ_MAX_BODY];
    uint8_t *out = m->tx_buf;
    size_t n = (size_t)KZ_HEADER_LEN + len, i, o, code_at;
    uint8_t code;
    uint16_t crc;
    body[0] = KZ_PROTOCOL_VERSION;
    body[1] = m->tx_seq;
    body[2] = msg_type;
    body[3] = len;
    if (len) memcpy(body + KZ_HEADER_LEN, payload, len);
    crc = kz_crc16_ccitt_false(body, n);
    put_u16(body + n, crc);
    n += KZ_CRC_LEN;
    m->tx_seq = (uint8_t)(m->tx_seq + 1u);
    /* COBS: 00 <encoded> 00 */
    out[0] = 0;
    code_at = 1;
    o = 2;
    code = 1;
    for (i = 0; i < n; i++) {
        if (body[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
            continue;
        }
        out[o++] = body[i];
        if (++code == 0xFF) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        }
    }
    out[code_at] = code;
    out[o++] = 0;
    m->hal.write(m->hal.ctx, out, o);
}

static void send_hello(kz_mcu_t *m) {
    uint8_t p[11];
    put_u32(p, m->boot_id);
    put_u16(p + 4, KZ_FW_VERSION);
    p[6] = KZ_PROTOCOL_VERSION;
    put_u32(p + 7, m->config_crc);
    send_frame(m, KZ_HELLO, p, sizeof p);
}

static void send_ack(kz_mcu_t *m, uint8_t seq, uint8_t type, uint32_t command_id) {
    uint8_t p[6];
    p[0] = seq;
    p[1] = type;
    put_u32(p + 2, command_id);
    send_frame(m, KZ_ACK, p, sizeof p);
}

static void send_nak(kz_mcu_t *m, uint8_t seq, uint8_t type, uint32_t command_id, uint8_t reason) {
    uint8_t p[7];
    p[0] = seq;
    p[1] = type;
    put_u32(p + 2, command_id);
    p[6] = reason;
    m->naks++;
    send_frame(m, KZ_NAK, p, sizeof p);
}

/* ------------------------------------------------------------------ events (PROTOCOL.md §6a)
 * Fired, Ended and Fault are events: numbered per boot, sent at once, kept in a ring and re-sent (50 ms,
 * doubling to 400 ms) until the host's EventAck names them. A full ring evicts its oldest entry (counted in
 * Status.events_dropped): with 128 slots and at most 64 queued commands that takes > 64 unacked faults. */
static kz_event_t *event_at(kz_mcu_t *m, uint16_t i) {
    return &m->events[(uint16_t)((m->event_head + i) % KZ_EVENT_SLOTS)];
}

static void post_event(kz_mcu_t *m, uint8_t type, const uint8_t *tail, uint8_t tail_len) {
    kz_event_t *e;
    if (m->event_count == KZ_EVENT_SLOTS) {
        m->event_head = (uint16_t)((m->event_head + 1u) % KZ_EVENT_SLOTS);
        m->event_count--;
        if (m->events_dropped < 0xFFFFu) m->events_dropped++;
    }
    e = event_at(m, m->event_count);
    m->event_count++;
    m->event_seq++;
    e->event_seq = m->event_seq;
    e->type = type;
    e->len = (uint8_t)(8u + tail_len);
    put_u32(e->payload, m->boot_id);
    put_u32(e->payload + 4, m->event_seq);
    memcpy(e->payload + 8, tail, tail_len);
    e->interval_us = KZ_EVENT_RESEND_US;
    e->next_tx_us = m->now_us + KZ_EVENT_RESEND_US;
    send_frame(m, e->type, e->payload, e->len);
}

static void on_event_ack(kz_mcu_t *m, const uint8_t *p) {
    uint32_t boot = get_u32(p), seq = get_u32(p + 4);
    uint16_t i, j;
    if (boot != m->boot_id) return; /* an ack meant for an earlier boot */
    for (i = 0; i < m->event_count; i++) {
        if (event_at(m, i)->event_seq != seq) continue;
        for (j = i; j + 1u < m->event_count; j++) *event_at(m, j) = *event_at(m, (uint16_t)(j + 1u));
        m->event_count--;
        return;
    }
}

static void resend_events(kz_mcu_t *m, uint64_t now_us) {
    uint16_t i;
    for (i = 0; i < m->event_count; i++) {
        kz_event_t *e = event_at(m, i);
        if (now_us < e->next_tx_us) continue;
        e->interval_us = e->interval_us * 2u > KZ_EVENT_RESEND_MAX_US ? KZ_EVENT_RESEND_MAX_US : e->interval_us * 2u;
        e->next_tx_us = now_us + e->interval_us;
        m->event_resends++;
        send_frame(m, e->type, e->payload, e->len);
    }
}

static void send_fault(kz_mcu_t *m, uint8_t code, uint32_t detail) {
    uint8_t p[5];
    p[0] = code;
    put_u32(p + 1, detail);
    m->faults++;
    post_event(m, KZ_FAULT, p, sizeof p);
}

static void send_ended(kz_mcu_t *m, uint32_t command_id, uint8_t reason) {
    uint8_t p[5];
    put_u32(p, command_id);
    p[4] = reason;
    post_event(m, KZ_ENDED, p, sizeof p);
}

static void send_status(kz_mcu_t *m) {
    uint8_t p[9];
    p[0] = m->queue_depth;
    p[1] = m->estop ? 1 : 0;
    p[2] = m->configured ? 1 : 0;
    p[3] = m->tripped ? 1 : 0;
    p[4] = (uint8_t)(m->event_count > 255u ? 255u : m->event_count);
    put_u16(p + 5, m->events_dropped);
    p[7] = m->armed ? 1 : 0;
    p[8] = m->belt_running ? 1 : 0;
    send_frame(m, KZ_STATUS, p, sizeof p);
}

/* ------------------------------------------------------------------ outputs */
static kz_output_t *find_output(kz_mcu_t *m, uint8_t id) {
    uint8_t i;
    for (i = 0; i < m->n_outputs; i++)
        if (m->outputs[i].id == id) return &m->outputs[i];
    return NULL;
}

static void output_off(kz_mcu_t *m, kz_output_t *o) {
    if (!o->on) return;
    o->on = 0;
    m->hal.output(m->hal.ctx, o->id, 0, 0, 0, 0);
}

static void all_outputs_off(kz_mcu_t *m) {
    uint8_t i;
    for (i = 0; i < m->n_outputs; i++) output_off(m, &m->outputs[i]);
}

static void fire(kz_mcu_t *m, const kz_cmd_t *c, uint64_t now_us) {
    uint8_t p[21];
    kz_output_t *o = find_output(m, c->diverter);
    uint64_t limit_at;
    if (o == NULL) return; /* cannot happen: the diverter was checked on acceptance */
    if (!o->on) o->on_since_us = now_us;
    o->on = 1;
    /* A new pulse may extend one in progress, but never past max_on_ms of continuous on-time. */
    o->off_at_us = now_us + (uint64_t)c->pulse_ms * 1000u;
    limit_at = o->on_since_us + (uint64_t)o->max_on_ms * 1000u;
    if (o->off_at_us > limit_at) o->off_at_us = limit_at;
    m->hal.output(m->hal.ctx, c->diverter, 1, c->on_count, c->pulse_ms, c->command_id);
    m->fired++;
    put_u32(p, c->command_id);
    p[4] = c->diverter;
    put_u64(p + 5, (uint64_t)c->on_count);
    put_u64(p + 13, now_us);
    post_event(m, KZ_FIRED, p, sizeof p);
}

/* ------------------------------------------------------------------ queue and outcome memory */
static kz_cmd_t *find_queued(kz_mcu_t *m, uint32_t command_id) {
    uint8_t i;
    for (i = 0; i < KZ_QUEUE_LIMIT; i++)
        if (m->queue[i].used && m->queue[i].command_id == command_id) return &m->queue[i];
    return NULL;
}

static uint32_t cancel_all(kz_mcu_t *m, uint8_t reason) {
    uint32_t n = 0;
    uint8_t i;
    /* Queue slots are reused, so report in command-id order to be deterministic, like the simulator's
     * insertion order for an increasing host counter. */
    for (;;) {
        kz_cmd_t *best = NULL;
        for (i = 0; i < KZ_QUEUE_LIMIT; i++)
            if (m->queue[i].used && (best == NULL || m->queue[i].command_id < best->command_id)) best = &m->queue[i];
        if (best == NULL) break;
        send_ended(m, best->command_id, reason);
        best->used = 0;
        n++;
    }
    m->queue_depth = 0;
    return n;
}

static const kz_outcome_t *find_outcome(const kz_mcu_t *m, uint32_t command_id) {
    uint16_t i;
    for (i = 0; i < m->outcome_count; i++)
        if (m->outcomes[i].command_id == command_id) return &m->outcomes[i];
    return NULL;
}

static void remember(kz_mcu_t *m, uint32_t command_id, uint8_t reason) {
    m->outcomes[m->outcome_head].command_id = command_id;
    m->outcomes[m->outcome_head].reason = reason;
    m->outcome_head = (uint16_t)((m->outcome_head + 1u) % KZ_OUTCOME_MEMORY);
    if (m->outcome_count < KZ_OUTCOME_MEMORY) m->outcome_count++;
}

/* ------------------------------------------------------------------ speed and compensation */
void kz_rate(const kz_mcu_t *m, int64_t *dc, int64_t *dt_us) {
    const kz_sample_t *a, *b;
    *dc = 0;
    *dt_us = 0;
    if (m->sample_count < 2) return;
    a = &m->samples[m->sample_head];
    b = &m->samples[(m->sample_head + m->sample_count - 1u) % KZ_RATE_SAMPLES];
    if (b->t_us <= a->t_us) return;
    *dc = b->count - a->count;
    *dt_us = (int64_t)(b->t_us - a->t_us);
}

static void sample(kz_mcu_t *m, uint64_t now_us, int64_t count) {
    kz_sample_t *last = NULL, *prev = NULL;
    if (m->sample_count > 0) last = &m->samples[(m->sample_head + m->sample_count - 1u) % KZ_RATE_SAMPLES];
    if (m->sample_count > 1) prev = &m->samples[(m->sample_head + m->sample_count - 2u) % KZ_RATE_SAMPLES];
    if (last != NULL && (last->t_us == now_us || (prev != NULL && now_us - prev->t_us < KZ_RATE_MIN_SPACING_US))) {
        last->t_us = now_us; /* same instant, or too close to keep: refresh the newest sample */
        last->count = count;
    } else {
        if (m->sample_count == KZ_RATE_SAMPLES) { /* cannot happen at >= 1 ms spacing; stay safe */
            m->sample_head = (uint16_t)((m->sample_head + 1u) % KZ_RATE_SAMPLES);
            m->sample_count--;
        }
        m->samples[(m->sample_head + m->sample_count) % KZ_RATE_SAMPLES].t_us = now_us;
        m->samples[(m->sample_head + m->sample_count) % KZ_RATE_SAMPLES].count = count;
        m->sample_count++;
    }
    /* Keep one anchor at or before the window start, so a slow poller still has a rate. */
    while (m->sample_count >= 2 &&
           m->samples[(m->sample_head + 1u) % KZ_RATE_SAMPLES].t_us + KZ_RATE_WINDOW_US <= now_us) {
        m->sample_head = (uint16_t)((m->sample_head + 1u) % KZ_RATE_SAMPLES);
        m->sample_count--;
    }
}

/* round(num / den) with ties to even (Python's round), den > 0, exact in integers. */
static int64_t div_round_half_even(int64_t num, int64_t den) {
    int64_t q = num / den, r = num % den;
    if (r < 0) { q -= 1; r += den; } /* floor division */
    if (2 * r > den || (2 * r == den && (q & 1))) q += 1;
    return q;
}

/* Counts the belt travels during the actuator's latency: round(latency_us * dc / dt_us). */
static int64_t compensation(const kz_mcu_t *m, uint32_t latency_us) {
    int64_t dc, dt;
    kz_rate(m, &dc, &dt);
    if (dt <= 0 || latency_us == 0 || dc == 0) return 0;
    if ((dc > 0 ? dc : -dc) > INT64_MAX / (int64_t)latency_us) /* absurd speed: saturate (-> LATE) */
        return dc > 0 ? INT64_MAX / 4 : -(INT64_MAX / 4);
    return div_round_half_even((int64_t)latency_us * dc, dt);
}

/* ------------------------------------------------------------------ receive: messages */
static int check_fire(kz_mcu_t *m, uint8_t diverter, uint16_t pulse_ms) {
    kz_output_t *o;
    if (m->estop) return KZ_NAK_ESTOP;
    if (!m->configured) return KZ_NAK_NOT_CONFIGURED;
    if (!m->armed) return KZ_NAK_NOT_ARMED;
    if (m->tripped) return KZ_NAK_WATCHDOG;
    o = find_output(m, diverter);
    if (o == NULL) return KZ_NAK_UNKNOWN_DIVERTER;
    if (pulse_ms < 1 || pulse_ms > o->max_on_ms) return KZ_NAK_BAD_PARAMS;
    return KZ_NAK_NONE;
}

/* A retransmitted command gets the same answer as the first copy, and is never queued twice. */
static int repeat_outcome(kz_mcu_t *m, uint8_t seq, uint8_t type, uint32_t command_id) {
    const kz_outcome_t *first = find_outcome(m, command_id);
    if (first == NULL) return 0;
    if (first->reason != KZ_NAK_NONE) send_nak(m, seq, type, command_id, first->reason);
    else send_ack(m, seq, type, command_id);
    return 1;
}

static void on_configure(kz_mcu_t *m, uint8_t seq, const uint8_t *p, uint8_t len) {
    uint32_t mm_bits = get_u32(p), crc;
    uint16_t wd = get_u16(p + 4), rep = get_u16(p + 6);
    uint8_t n = p[8], i, j;
    int valid;
    /* mm_per_count finite and > 0, checked on the IEEE-754 bits: sign 0, exponent not all ones, not zero. */
    valid = (mm_bits & 0x80000000u) == 0 && (mm_bits & 0x7F800000u) != 0x7F800000u && mm_bits != 0 &&
            wd >= 20 && rep >= 1;
    for (i = 0; valid && i < n; i++) {
        const uint8_t *d = p + 9 + 7u * i;
        if (get_u16(d + 5) < 1) valid = 0;
        for (j = 0; j < i; j++)
            if (p[9 + 7u * j] == d[0]) valid = 0;
    }
    if (!valid) {
        send_nak(m, seq, KZ_CONFIGURE, 0, KZ_NAK_BAD_PARAMS);
        return;
    }
    crc = kz_crc32(p, len);
    if (crc != m->config_crc) cancel_all(m, KZ_NAK_NOT_CONFIGURED);
    all_outputs_off(m); /* outputs of the old table: never leave one on across a re-map */
    m->configured = 1;
    m->config_crc = crc;
    m->watchdog_ms = wd;
    m->report_interval_ms = rep;
    m->n_outputs = n;
    for (i = 0; i < n; i++) {
        const uint8_t *d = p + 9 + 7u * i;
        m->outputs[i].id = d[0];
        m->outputs[i].latency_us = get_u32(d + 1);
        m->outputs[i].max_on_ms = get_u16(d + 5);
        m->outputs[i].on = 0;
    }
    m->tripped = 0;
    send_ack(m, seq, KZ_CONFIGURE, 0);
    send_status(m);
}

static void on_fire_at(kz_mcu_t *m, uint8_t seq, const uint8_t *p, int64_t count) {
    uint32_t id = get_u32(p);
    uint8_t diverter = p[4];
    int64_t belt_count = (int64_t)get_u64(p + 5), on_count = belt_count;
    uint16_t pulse = get_u16(p + 13);
    int reason;
    uint8_t i;
    if (repeat_outcome(m, seq, KZ_FIRE_AT, id)) return;
    reason = check_fire(m, diverter, pulse);
    if (reason == KZ_NAK_NONE && m->queue_depth >= KZ_QUEUE_LIMIT) reason = KZ_NAK_QUEUE_FULL;
    if (reason == KZ_NAK_NONE) {
        on_count = belt_count - compensation(m, find_output(m, diverter)->latency_us);
        if (count >= on_count) reason = KZ_NAK_LATE; /* never fire late */
    }
    if (reason != KZ_NAK_NONE) {
        send_nak(m, seq, KZ_FIRE_AT, id, (uint8_t)reason);
        remember(m, id, (uint8_t)reason);
        return;
    }
    for (i = 0; i < KZ_QUEUE_LIMIT; i++)
        if (!m->queue[i].used) break;
    m->queue[i].used = 1;
    m->queue[i].command_id = id;
    m->queue[i].diverter = diverter;
    m->queue[i].on_count = on_count;
    m->queue[i].pulse_ms = pulse;
    m->queue_depth++;
    remember(m, id, KZ_NAK_NONE);
    send_ack(m, seq, KZ_FIRE_AT, id);
    send_status(m);
}

static void on_fire_now(kz_mcu_t *m, uint8_t seq, const uint8_t *p, uint64_t now_us, int64_t count) {
    kz_cmd_t c;
    int reason;
    c.command_id = get_u32(p);
    c.diverter = p[4];
    c.pulse_ms = get_u16(p + 5);
    c.on_count = count;
    c.used = 0;
    if (repeat_outcome(m, seq, KZ_FIRE_NOW, c.command_id)) return;
    reason = check_fire(m, c.diverter, c.pulse_ms);
    if (reason != KZ_NAK_NONE) {
        send_nak(m, seq, KZ_FIRE_NOW, c.command_id, (uint8_t)reason);
        remember(m, c.command_id, (uint8_t)reason);
        return;
    }
    remember(m, c.command_id, KZ_NAK_NONE);
    send_ack(m, seq, KZ_FIRE_NOW, c.command_id);
    fire(m, &c, now_us);
}

static void on_cancel(kz_mcu_t *m, uint8_t seq, const uint8_t *p) {
    uint32_t id = get_u32(p);
    kz_cmd_t *c = find_queued(m, id);
    if (c == NULL) {
        send_nak(m, seq, KZ_CANCEL, id, KZ_NAK_NOT_QUEUED);
        return;
    }
    c->used = 0;
    m->queue_depth--;
    send_ack(m, seq, KZ_CANCEL, id);
    send_ended(m, id, KZ_NAK_CANCELLED);
    send_status(m);
}

/* Drive the belt-run output; returns 1 if it changed. */
static int set_belt(kz_mcu_t *m, int run) {
    if ((run ? 1 : 0) == m->belt_running) return 0;
    m->belt_running = run ? 1 : 0;
    if (m->hal.belt != NULL) m->hal.belt(m->hal.ctx, m->belt_running);
    return 1;
}

/* BeltRun (PROTOCOL.md §5a): stopping is always allowed (the safe direction); running needs what firing
 * needs. Queued commands stay queued across a stop: they are scheduled by belt position, not time. */
static void on_belt_run(kz_mcu_t *m, uint8_t seq, const uint8_t *p) {
    uint8_t run = p[0];
    int reason = KZ_NAK_NONE;
    if (run > 1) reason = KZ_NAK_BAD_PARAMS;
    else if (run) {
        if (m->estop) reason = KZ_NAK_ESTOP;
        else if (!m->configured) reason = KZ_NAK_NOT_CONFIGURED;
        else if (!m->armed) reason = KZ_NAK_NOT_ARMED;
        else if (m->tripped) reason = KZ_NAK_WATCHDOG;
    }
    if (reason != KZ_NAK_NONE) {
        send_nak(m, seq, KZ_BELT_RUN, 0, (uint8_t)reason);
        return;
    }
    run = (uint8_t)set_belt(m, run);
    send_ack(m, seq, KZ_BELT_RUN, 0);
    if (run) send_status(m);
}

/* Arm (PROTOCOL.md §6): 1 = the explicit re-arm after an e-stop; 0 = disarm (a software e-stop). */
static void on_arm(kz_mcu_t *m, uint8_t seq, const uint8_t *p) {
    uint8_t arm = p[0];
    int changed;
    if (arm > 1) {
        send_nak(m, seq, KZ_ARM, 0, KZ_NAK_BAD_PARAMS);
        return;
    }
    if (arm && m->estop) { /* still pressed: nothing to re-arm yet */
        send_nak(m, seq, KZ_ARM, 0, KZ_NAK_ESTOP);
        return;
    }
    changed = m->armed != arm;
    m->armed = arm;
    if (!arm) {
        all_outputs_off(m);
        set_belt(m, 0);
        cancel_all(m, KZ_NAK_NOT_ARMED);
    }
    send_ack(m, seq, KZ_ARM, 0);
    if (changed) send_status(m);
}

/* Payload check per type (the simulator's decode_message): 1 = ok, 0 = BAD_PARAMS, -1 = unknown type. */
static int payload_ok(uint8_t type, const uint8_t *p, uint8_t len) {
    switch (type) {
    case KZ_CONFIGURE: return len >= 9 && len == 9u + 7u * p[8];
    case KZ_FIRE_AT: return len == 15;
    case KZ_FIRE_NOW: return len == 7;
    case KZ_CANCEL: return len == 4;
    case KZ_HEARTBEAT: return len == 12;
    case KZ_IDENTIFY: return len == 0;
    case KZ_EVENT_ACK: return len == 8;
    case KZ_BELT_RUN: return len == 1;
    case KZ_ARM: return len == 1;
    case KZ_GATE_SETUP: return len == 4;
    case KZ_HELLO: return len == 11;
    case KZ_ACK: return len == 6;
    case KZ_NAK: return len == 7 && p[6] >= KZ_NAK_LATE && p[6] <= KZ_NAK_NOT_ARMED;
    case KZ_FIRED: return len == 29;
    case KZ_ENCODER_REPORT: return len == 16;
    case KZ_FAULT: return len == 13 && p[8] >= KZ_FAULT_WATCHDOG && p[8] <= KZ_FAULT_BAD_VERSION;
    case KZ_STATUS: return len == 9;
    case KZ_ENDED: return len == 13 && p[12] >= KZ_NAK_LATE && p[12] <= KZ_NAK_NOT_ARMED;
    case KZ_INPUT_EDGE: return len == 26 && p[9] <= 1;
    default: return -1;
    }
}

static int take_drop(kz_mcu_t *m, uint8_t type) {
    uint8_t i;
    for (i = 0; i < KZ_DROP_SLOTS; i++)
        if (m->drop_left[i] > 0 && m->drop_type[i] == type) {
            m->drop_left[i]--;
            return 1;
        }
    return 0;
}

static void on_frame(kz_mcu_t *m, const uint8_t *body, size_t n, uint64_t now_us, int64_t count) {
    uint8_t version = body[0], seq = body[1], type = body[2], len = body[3];
    const uint8_t *p = body + KZ_HEADER_LEN;
    int ok;
    (void)n;
    if (version != KZ_PROTOCOL_VERSION) {
        m->bad_frames++;
        send_fault(m, KZ_FAULT_BAD_VERSION, version);
        return;
    }
    ok = payload_ok(type, p, len);
    if (ok <= 0) {
        m->bad_frames++;
        send_nak(m, seq, type, 0, ok < 0 ? KZ_NAK_UNSUPPORTED : KZ_NAK_BAD_PARAMS);
        return;
    }
    if (take_drop(m, type)) return;
    m->frames_rx++;
    m->last_host_rx_us = now_us;
    switch (type) {
    case KZ_HEARTBEAT:
        if (m->tripped) {
            m->tripped = 0; /* the host shows its link thread is alive again: re-armed */
            send_status(m);
        }
        break;
    case KZ_IDENTIFY: send_hello(m); break;
    case KZ_CONFIGURE: on_configure(m, seq, p, len); break;
    case KZ_FIRE_AT: on_fire_at(m, seq, p, count); break;
    case KZ_FIRE_NOW: on_fire_now(m, seq, p, now_us, count); break;
    case KZ_CANCEL: on_cancel(m, seq, p); break;
    case KZ_EVENT_ACK: on_event_ack(m, p); break;
    case KZ_BELT_RUN: on_belt_run(m, seq, p); break;
    case KZ_ARM: on_arm(m, seq, p); break;
    case KZ_GATE_SETUP: /* any mask: inputs the board has not wired never change */
        m->gate_mask = get_u32(p);
        send_ack(m, seq, KZ_GATE_SETUP, 0);
        break;
    default: send_nak(m, seq, type, 0, KZ_NAK_UNSUPPORTED); break; /* an MCU->host type sent to us */
    }
}

/* ------------------------------------------------------------------ receive: framing */
static void on_chunk(kz_mcu_t *m, uint64_t now_us, int64_t count) {
    const uint8_t *in = m->rx_buf;
    size_t n = m->rx_len, i = 0, o = 0;
    while (i < n) {
        uint8_t code = in[i];
        size_t end = i + code, k;
        if (code == 0 || end > n) { m->malformed++; return; }
        for (k = i + 1; k < end; k++) {
            if (o >= KZ_MAX_BODY) { m->malformed++; return; }
            m->body[o++] = in[k];
        }
        i = end;
        if (code != 0xFF && i < n) {
            if (o >= KZ_MAX_BODY) { m->malformed++; return; }
            m->body[o++] = 0;
        }
    }
    if (o < KZ_MIN_BODY || m->body[3] != o - KZ_MIN_BODY) { m->malformed++; return; }
    if (kz_crc16_ccitt_false(m->body, o - KZ_CRC_LEN) != get_u16(m->body + o - KZ_CRC_LEN)) {
        m->crc_errors++;
        return;
    }
    on_frame(m, m->body, o, now_us, count);
}

void kz_rx_bytes(kz_mcu_t *m, const uint8_t *data, size_t len, uint64_t now_us, int64_t count) {
    size_t i;
    m->now_us = now_us;
    for (i = 0; i < len; i++) {
        uint8_t b = data[i];
        if (b == 0) {
            if (m->rx_discarding) m->malformed++;
            else if (m->rx_len > 0) on_chunk(m, now_us, count);
            m->rx_len = 0;
            m->rx_discarding = 0;
        } else if (!m->rx_discarding) {
            if (m->rx_len >= KZ_MAX_ENCODED) { /* no frame is this long: garbage until the next 00 */
                m->rx_discarding = 1;
                m->rx_len = 0;
            } else {
                m->rx_buf[m->rx_len++] = b;
            }
        }
    }
}

/* ------------------------------------------------------------------ time-driven work */
static void fire_due(kz_mcu_t *m, int64_t count, uint64_t now_us) {
    int any = 0;
    for (;;) { /* due commands in (on_count, command_id) order */
        kz_cmd_t *best = NULL, c;
        uint8_t i;
        for (i = 0; i < KZ_QUEUE_LIMIT; i++) {
            kz_cmd_t *q = &m->queue[i];
            if (!q->used || q->on_count > count) continue;
            if (best == NULL || q->on_count < best->on_count ||
                (q->on_count == best->on_count && q->command_id < best->command_id))
                best = q;
        }
        if (best == NULL) break;
        c = *best;
        best->used = 0;
        m->queue_depth--;
        fire(m, &c, now_us);
        any = 1;
    }
    if (any) send_status(m);
}

static void end_pulses(kz_mcu_t *m, uint64_t now_us) {
    uint8_t i;
    for (i = 0; i < m->n_outputs; i++)
        if (m->outputs[i].on && now_us >= m->outputs[i].off_at_us) output_off(m, &m->outputs[i]);
}

static void check_watchdog(kz_mcu_t *m, uint64_t now_us) {
    uint32_t n;
    if (!m->configured || m->tripped) return;
    if (now_us <= m->last_host_rx_us || now_us - m->last_host_rx_us <= (uint64_t)m->watchdog_ms * 1000u) return;
    m->tripped = 1;
    m->watchdog_trips++;
    all_outputs_off(m);
    n = cancel_all(m, KZ_NAK_WATCHDOG);
    send_fault(m, KZ_FAULT_WATCHDOG, n);
    send_status(m);
}

static void periodic(kz_mcu_t *m, uint64_t now_us, int64_t count) {
    uint32_t interval_ms = m->configured ? m->report_interval_ms : KZ_DEFAULT_REPORT_INTERVAL_MS;
    if (now_us >= m->next_report_us) {
        uint8_t p[16];
        put_u64(p, (uint64_t)count);
        put_u64(p + 8, now_us);
        send_frame(m, KZ_ENCODER_REPORT, p, sizeof p);
        m->next_report_us = now_us + (uint64_t)interval_ms * 1000u; /* from now: never a stale backlog */
    }
    if (now_us >= m->next_heartbeat_us) {
        uint8_t p[12];
        put_u64(p, now_us);
        put_u32(p + 8, m->boot_id); /* a reset is noticed even when its Hello was lost */
        send_frame(m, KZ_HEARTBEAT, p, sizeof p);
        m->next_heartbeat_us = now_us + KZ_HEARTBEAT_PERIOD_US;
    }
    if (now_us >= m->next_status_us) {
        send_status(m);
        m->next_status_us = now_us + KZ_STATUS_PERIOD_US;
    }
    resend_events(m, now_us);
}

void kz_poll(kz_mcu_t *m, uint64_t now_us, int64_t count) {
    m->now_us = now_us;
    sample(m, now_us, count);
    end_pulses(m, now_us);
    fire_due(m, count, now_us);
    check_watchdog(m, now_us);
    periodic(m, now_us, count);
}

/* ------------------------------------------------------------------ lifecycle and inputs */
void kz_init(kz_mcu_t *m, const kz_hal_t *hal, uint32_t boot_id, uint64_t now_us, int estop_active) {
    memset(m, 0, sizeof *m);
    m->hal = *hal;
    m->boot_id = boot_id ? boot_id : 1u;
    m->estop = estop_active ? 1 : 0;
    /* Armed unless the e-stop is pressed at power-on: a fresh boot has no queue and no configuration, so
     * nothing fires before the host configures it and sends new commands (PROTOCOL.md §6). The belt
     * output starts off (memset). */
    m->armed = m->estop ? 0 : 1;
    m->last_host_rx_us = now_us;
    m->next_report_us = now_us;
    m->next_heartbeat_us = now_us;
    m->next_status_us = now_us;
    m->now_us = now_us;
    send_hello(m);
}

void kz_set_estop(kz_mcu_t *m, int active, uint64_t now_us) {
    uint32_t n;
    m->now_us = now_us;
    if ((active ? 1 : 0) == m->estop) return;
    m->estop = active ? 1 : 0;
    if (m->estop) {
        m->armed = 0; /* releasing does not re-arm: only the host's Arm(1) does */
        set_belt(m, 0);
        all_outputs_off(m);
        n = cancel_all(m, KZ_NAK_ESTOP);
        send_fault(m, KZ_FAULT_ESTOP, n);
    }
    send_status(m);
}

void kz_input_edge(kz_mcu_t *m, uint8_t input, int rising, int64_t edge_count, uint64_t edge_us, uint64_t now_us) {
    uint8_t p[18];
    m->now_us = now_us;
    if (input >= 32u || !((m->gate_mask >> input) & 1u)) return;
    p[0] = input;
    p[1] = rising ? 1u : 0u;
    put_u64(p + 2, (uint64_t)edge_count);
    put_u64(p + 10, edge_us);
    post_event(m, KZ_INPUT_EDGE, p, sizeof p);
}

int kz_next_on_count(const kz_mcu_t *m, int64_t *on_count, uint8_t *diverter) {
    const kz_cmd_t *best = NULL;
    uint8_t i;
    for (i = 0; i < KZ_QUEUE_LIMIT; i++)
        if (m->queue[i].used && (best == NULL || m->queue[i].on_count < best->on_count)) best = &m->queue[i];
    if (best == NULL) return 0;
    *on_count = best->on_count;
    *diverter = best->diverter;
    return 1;
}

void kz_drop_rx(kz_mcu_t *m, uint8_t msg_type, uint16_t n) {
    uint8_t i;
    for (i = 0; i < KZ_DROP_SLOTS; i++)
        if (m->drop_left[i] == 0 || m->drop_type[i] == msg_type) {
            m->drop_left[i] = (uint16_t)(m->drop_left[i] + n);
            m->drop_type[i] = msg_type;
            return;
        }
}
