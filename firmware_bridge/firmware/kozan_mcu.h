/*
 * Kozan diverter MCU: the protocol core (firmware_bridge/PROTOCOL.md v3), portable C99.
 *
 * Why a "core" with no I/O of its own: the same code runs on the board (board_arduino/, with the encoder
 * ISR and the output pins) and on Linux (host_main.c, on a pseudo-terminal), so the conformance suite
 * that drives the host build through the real host link also vouches for the code that is flashed.
 *
 * Rules for this file: no malloc, fixed-size buffers only, no floating point (the Configure f32 is
 * validated and hashed as raw bits), no libc beyond <stdint.h>/<stddef.h>/<string.h>. Everything the
 * core needs from the world arrives as arguments (MCU time in microseconds, encoder count) or goes out
 * through the two callbacks in kz_hal_t. The core is not re-entrant: call it from the main loop only;
 * an ISR may read kz_next_on_count() through a copy the main loop publishes (see board_arduino.ino).
 */
#ifndef KOZAN_MCU_H
#define KOZAN_MCU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KZ_PROTOCOL_VERSION 3u
#define KZ_FW_VERSION 0x0300u

#define KZ_HEADER_LEN 4u
#define KZ_CRC_LEN 2u
#define KZ_MAX_PAYLOAD 255u
#define KZ_MIN_BODY (KZ_HEADER_LEN + KZ_CRC_LEN)
#define KZ_MAX_BODY (KZ_HEADER_LEN + KZ_MAX_PAYLOAD + KZ_CRC_LEN) /* 261 */
#define KZ_MAX_ENCODED (KZ_MAX_BODY + (KZ_MAX_BODY + 253u) / 254u) /* 263 */
#define KZ_MAX_WIRE (KZ_MAX_ENCODED + 2u)                         /* 00 <cobs> 00 */

#define KZ_QUEUE_LIMIT 64u
#define KZ_OUTCOME_MEMORY 1024u
#define KZ_MAX_DIVERTERS 35u
#define KZ_RATE_WINDOW_US 100000u
#define KZ_RATE_SAMPLES 128u         /* at >= 1 ms spacing: always spans the 100 ms window */
#define KZ_RATE_MIN_SPACING_US 1000u
#define KZ_HEARTBEAT_PERIOD_US 100000u
#define KZ_STATUS_PERIOD_US 500000u
#define KZ_DEFAULT_REPORT_INTERVAL_MS 20u
#define KZ_DROP_SLOTS 8u
#define KZ_EVENT_SLOTS 128u          /* unacked events: queue (64) + FireNow reports and faults */
#define KZ_EVENT_PAYLOAD_MAX 29u     /* Fired, the longest event */
#define KZ_EVENT_RESEND_US 50000u    /* first re-send of an unacked event; doubles per re-send ... */
#define KZ_EVENT_RESEND_MAX_US 400000u /* ... up to this */

enum kz_msg_type {
    KZ_CONFIGURE = 0x01,
    KZ_FIRE_AT = 0x02,
    KZ_FIRE_NOW = 0x03,
    KZ_CANCEL = 0x04,
    KZ_HEARTBEAT = 0x05,
    KZ_IDENTIFY = 0x06,
    KZ_EVENT_ACK = 0x07,
    KZ_BELT_RUN = 0x08,
    KZ_ARM = 0x09,
    KZ_GATE_SETUP = 0x0A,
    KZ_HELLO = 0x80,
    KZ_ACK = 0x81,
    KZ_NAK = 0x82,
    KZ_FIRED = 0x83,
    KZ_ENCODER_REPORT = 0x84,
    KZ_FAULT = 0x85,
    KZ_STATUS = 0x86,
    KZ_ENDED = 0x87,
    KZ_INPUT_EDGE = 0x88
};

enum kz_nak_reason {
    KZ_NAK_NONE = 0, /* internal: "accepted" in the outcome memory */
    KZ_NAK_LATE = 1,
    KZ_NAK_QUEUE_FULL = 2,
    KZ_NAK_BAD_PARAMS = 3,
    KZ_NAK_NOT_CONFIGURED = 4,
    KZ_NAK_UNKNOWN_DIVERTER = 5,
    KZ_NAK_ESTOP = 6,
    KZ_NAK_WATCHDOG = 7,
    KZ_NAK_NOT_QUEUED = 8,
    KZ_NAK_UNSUPPORTED = 9,
    KZ_NAK_CANCELLED = 10, /* only in Ended */
    KZ_NAK_NOT_ARMED = 11  /* e-stop released (or host Arm(0)) and no Arm(1) since */
};

enum kz_fault_code { KZ_FAULT_WATCHDOG = 1, KZ_FAULT_ESTOP = 2, KZ_FAULT_BAD_VERSION = 3 };

/* What the core needs from the board. Both callbacks are called from kz_* functions, never from an ISR. */
typedef struct kz_hal {
    void *ctx;
    /* Queue bytes for the serial port. Must not block for long; drop on overflow (a UART with no
     * listener drops too, and the protocol recovers). */
    void (*write)(void *ctx, const uint8_t *data, size_t len);
    /* Switch an output. on=1: the command `command_id` fires `diverter` with the belt at `on_count` for
     * `pulse_ms`; on=0: switch it off (pulse over, max on-time, watchdog, e-stop). */
    void (*output)(void *ctx, uint8_t diverter, int on, int64_t on_count, uint16_t pulse_ms,
                   uint32_t command_id);
    /* Switch the belt-run output (BeltRun, PROTOCOL.md §5a): run=1 run, 0 stop. May be NULL (no belt
     * output wired); the core still tracks and reports the state. */
    void (*belt)(void *ctx, int run);
} kz_hal_t;

typedef struct {
    uint32_t command_id;
    int64_t on_count;
    uint16_t pulse_ms;
    uint8_t diverter;
    uint8_t used;
} kz_cmd_t;

typedef struct {
    uint32_t command_id;
    uint8_t reason; /* KZ_NAK_NONE = acked */
} kz_outcome_t;

typedef struct {
    uint8_t id;
    uint8_t on;
    uint16_t max_on_ms;
    uint32_t latency_us;
    uint64_t on_since_us;
    uint64_t off_at_us;
} kz_output_t;

typedef struct {
    uint64_t t_us;
    int64_t count;
} kz_sample_t;

/* An event (Fired, Ended, Fault) sent and kept until the host acks its event_seq (PROTOCOL.md §6a). */
typedef struct {
    uint32_t event_seq;
    uint64_t next_tx_us;
    uint32_t interval_us;
    uint8_t type;
    uint8_t len;
    uint8_t payload[KZ_EVENT_PAYLOAD_MAX];
} kz_event_t;

typedef struct kz_mcu {
    kz_hal_t hal;
    uint32_t boot_id;
    uint8_t tx_seq;
    uint8_t estop;
    uint8_t tripped;
    uint8_t configured;
    uint8_t armed;        /* 0 after an e-stop press or a host Arm(0), until the host's Arm(1) */
    uint8_t belt_running; /* the belt-run output */
    uint32_t gate_mask;   /* inputs reported as InputEdge events (GateSetup, PROTOCOL.md §6b); 0 at boot */
    uint32_t config_crc;
    uint16_t watchdog_ms;
    uint16_t report_interval_ms;
    uint8_t n_outputs;
    kz_output_t outputs[KZ_MAX_DIVERTERS];
    kz_cmd_t queue[KZ_QUEUE_LIMIT];
    uint8_t queue_depth;
    kz_outcome_t outcomes[KZ_OUTCOME_MEMORY];
    uint16_t outcome_head; /* next slot to write (oldest once full) */
    uint16_t outcome_count;
    kz_sample_t samples[KZ_RATE_SAMPLES];
    uint16_t sample_head; /* index of the oldest sample */
    uint16_t sample_count;
    uint64_t last_host_rx_us;
    uint64_t next_report_us;
    uint64_t next_heartbeat_us;
    uint64_t next_status_us;
    /* unacked events, oldest first: a ring of event_count entries starting at event_head */
    kz_event_t events[KZ_EVENT_SLOTS];
    uint16_t event_head;
    uint16_t event_count;
    uint32_t event_seq; /* last event number used this boot */
    uint16_t events_dropped; /* evicted unacked from a full ring (saturates) */
    uint64_t now_us; /* MCU time of the call in progress (stamps events) */
    /* receive path */
    uint8_t rx_buf[KZ_MAX_ENCODED];
    uint16_t rx_len;
    uint8_t rx_discarding; /* > KZ_MAX_ENCODED bytes without a delimiter: drop until the next 00 */
    uint8_t body[KZ_MAX_BODY];
    uint8_t tx_buf[KZ_MAX_WIRE];
    /* fault injection (conformance tests): drop the next n valid frames of a type */
    uint8_t drop_type[KZ_DROP_SLOTS];
    uint16_t drop_left[KZ_DROP_SLOTS];
    /* counters, for a technician's console */
    uint32_t frames_rx;
    uint32_t bad_frames; /* decoded but refused: version, type, payload */
    uint32_t crc_errors;
    uint32_t malformed;
    uint32_t fired;
    uint32_t naks;
    uint32_t watchdog_trips;
    uint32_t faults;
    uint32_t event_resends;
} kz_mcu_t;

/* Power-on: everything forgotten except the e-stop input level; sends Hello(config_crc = 0).
 * boot_id must be random and non-zero (0 is replaced by 1). */
void kz_init(kz_mcu_t *m, const kz_hal_t *hal, uint32_t boot_id, uint64_t now_us, int estop_active);

/* Feed received bytes (any split). Complete frames are handled at once with `now_us`/`count`. */
void kz_rx_bytes(kz_mcu_t *m, const uint8_t *data, size_t len, uint64_t now_us, int64_t count);

/* One service pass after reading: sample the speed, fire due commands, end pulses, run the watchdog,
 * send periodic reports. Call as often as possible (every main-loop turn). */
void kz_poll(kz_mcu_t *m, uint64_t now_us, int64_t count);

/* The e-stop input changed (debounced by the board). Pressing flushes the queue, switches outputs and the
 * belt off and disarms; releasing does not re-arm: only the host's Arm(1) does (PROTOCOL.md §6). */
void kz_set_estop(kz_mcu_t *m, int active, uint64_t now_us);

/* A digital input (light gate, actuator sensor) changed level (PROTOCOL.md §6b). The board's pin ISR stamps the
 * edge with the encoder count and the MCU time and queues it; the main loop then calls this (the core is not
 * re-entrant). Sent as an InputEdge event if `input` (0..31) is in the host's GateSetup mask, else ignored. */
void kz_input_edge(kz_mcu_t *m, uint8_t input, int rising, int64_t edge_count, uint64_t edge_us, uint64_t now_us);
/* Lowest on_count in the queue, for an encoder compare ISR; returns 0 if the queue is empty. */
int kz_next_on_count(const kz_mcu_t *m, int64_t *on_count, uint8_t *diverter);

/* Belt speed measure used for latency compensation: count change dc over time dt_us (dt_us 0 = none). */
void kz_rate(const kz_mcu_t *m, int64_t *dc, int64_t *dt_us);

/* Fault injection for the conformance tests (the board never calls it). */
void kz_drop_rx(kz_mcu_t *m, uint8_t msg_type, uint16_t n);

/* Exposed for tests and for the board's self-test. */
uint16_t kz_crc16_ccitt_false(const uint8_t *data, size_t len);
uint32_t kz_crc32(const uint8_t *data, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* KOZAN_MCU_H */
