/*
 * Kozan diverter MCU: board layer for an RP2040 board (Raspberry Pi Pico / Pico W) on arduino-pico
 * (Earle Philhower's core). The protocol lives in kozan_mcu.c (copied next to this file by
 * `make arduino-sketch`, see ../README.md); this file only owns the hardware:
 *
 *   - the quadrature encoder (two GPIO interrupts, x4 decoding) and a compare that switches the next
 *     due output *in the ISR* at exactly its on_count, so main-loop latency never delays a fire;
 *   - the output pins (active high, through a MOSFET/relay driver to the valves), all off at reset;
 *   - the e-stop input (NC contact to GND with pull-up: a pressed button *or a broken wire* reads HIGH
 *     = stopped), debounced for 5 ms;
 *   - USB-CDC serial, never blocking (bytes the host does not read are dropped, like a UART);
 *   - the RP2040 hardware watchdog (100 ms): if this loop ever hangs, the chip resets and every output
 *     pin returns to its reset state (input, pulled low by the driver's gate resistor).
 *
 * Why the ISR only switches a pin on and never touches the core: the core is not re-entrant. The ISR
 * fires from a copy (g_armed_*) that the main loop publishes with interrupts off; the main loop then
 * lets the core fire the same command (bookkeeping, pulse timer, Fired message) on its next pass.
 */
#include <Arduino.h>

extern "C" {
#include "kozan_mcu.h"
}

/* ------------------------------------------------------------------ wiring (edit for your board) */
static const uint8_t PIN_ENC_A = 2;
static const uint8_t PIN_ENC_B = 3;
static const uint8_t PIN_ESTOP = 4;
static const uint8_t PIN_BELT = 9; /* belt-run output (BeltRun): active high into the motor starter's run input */
static const uint32_t BAUD = 250000; /* ignored by USB-CDC, used if you switch to Serial1 (UART) */

/* Diverter id (as configured by the host) -> GPIO pin. An id with no pin here cannot switch anything:
 * keep this table and the station's calibration in step. */
struct OutputPin {
    uint8_t diverter;
    uint8_t pin;
};
static const OutputPin OUTPUT_PINS[] = {
    {0, 10}, {1, 11}, {2, 12}, {3, 13}, {4, 14}, {5, 15}, {6, 16}, {7, 17},
};
static const size_t N_OUTPUT_PINS = sizeof(OUTPUT_PINS) / sizeof(OUTPUT_PINS[0]);

/* Digital input id (InputEdge, PROTOCOL.md §6b) -> GPIO pin: light gates and actuator sensors (open-collector
 * / PNP via an opto, INPUT_PULLUP; a blocked beam reads LOW and is reported as rising = 1). The station's
 * convention: diverter d's belt gate is input 2d, its actuator sensor 2d + 1 (`kozan calibrate diverters`). */
struct InputPin {
    uint8_t input;
    uint8_t pin;
};
static const InputPin INPUT_PINS[] = {
    {0, 5}, {1, 6}, {2, 7}, {3, 8}, {4, 18}, {5, 19}, {6, 20}, {7, 21}, {8, 22}, {9, 26}, /* diverters 0-4 */
};
static const size_t N_INPUT_PINS = sizeof(INPUT_PINS) / sizeof(INPUT_PINS[0]);

/* ------------------------------------------------------------------ state shared with ISRs */
static volatile int64_t g_count = 0;
static volatile uint8_t g_enc_state = 0;
static volatile bool g_armed = false;
static volatile int64_t g_armed_on_count = 0;
static volatile int8_t g_armed_pin = -1;
static volatile bool g_isr_fired = false;
static volatile int64_t g_isr_fired_count = 0;

/* Input edges stamped in the pin ISR (count and time at the edge), handed to the core by the main loop. */
struct EdgeRec {
    uint8_t input;
    uint8_t rising;
    int64_t count;
    uint64_t t_us;
};
static const uint8_t EDGE_RING = 32;
static volatile EdgeRec g_edges[EDGE_RING];
static volatile uint8_t g_edge_head = 0, g_edge_len = 0;

static kz_mcu_t g_mcu;
static bool g_estop_level = false;
static bool g_estop_candidate = false;
static uint64_t g_estop_since_us = 0;

static int8_t pin_for(uint8_t diverter) {
    for (size_t i = 0; i < N_OUTPUT_PINS; i++)
        if (OUTPUT_PINS[i].diverter == diverter) return (int8_t)OUTPUT_PINS[i].pin;
    return -1;
}

/* x4 quadrature decoding: index = previous AB << 2 | current AB. Invalid transitions count 0. */
static const int8_t QUAD_TABLE[16] = {0, -1, 1, 0, 1, 0, 0, -1, -1, 0, 0, 1, 0, 1, -1, 0};

static void encoder_isr() {
    uint8_t ab = (uint8_t)((gpio_get(PIN_ENC_A) ? 2 : 0) | (gpio_get(PIN_ENC_B) ? 1 : 0));
    g_enc_state = (uint8_t)(((g_enc_state << 2) | ab) & 0x0F);
    int64_t c = g_count + QUAD_TABLE[g_enc_state];
    g_count = c;
    if (g_armed && c >= g_armed_on_count) { /* the compare: switch exactly at on_count */
        if (g_armed_pin >= 0) gpio_put((uint)g_armed_pin, 1);
        g_armed = false;
        g_isr_fired = true;
        g_isr_fired_count = c;
    }
}

static void gate_isr(void *param) {
    size_t i = (size_t)(uintptr_t)param;
    if (g_edge_len >= EDGE_RING) return; /* a chattering input: drop rather than overwrite */
    volatile EdgeRec &r = g_edges[(uint8_t)((g_edge_head + g_edge_len) % EDGE_RING)];
    r.input = INPUT_PINS[i].input;
    r.rising = gpio_get(INPUT_PINS[i].pin) ? 0 : 1; /* LOW = beam blocked / sensor active */
    r.count = g_count;
    r.t_us = time_us_64();
    g_edge_len++;
}

static int64_t read_count() {
    noInterrupts();
    int64_t c = g_count;
    interrupts();
    return c;
}

/* ------------------------------------------------------------------ HAL for the core */
static void hal_write(void *ctx, const uint8_t *data, size_t len) {
    (void)ctx;
    if ((size_t)Serial.availableForWrite() < len) return; /* host not reading: drop, never block */
    Serial.write(data, len);
}

static void hal_output(void *ctx, uint8_t diverter, int on, int64_t on_count, uint16_t pulse_ms, uint32_t id) {
    (void)ctx;
    (void)on_count;
    (void)pulse_ms;
    (void)id;
    int8_t pin = pin_for(diverter);
    if (pin >= 0) gpio_put((uint)pin, on ? 1 : 0);
}

static void hal_belt(void *ctx, int run) {
    (void)ctx;
    gpio_put(PIN_BELT, run ? 1 : 0);
}

static const kz_hal_t HAL = {NULL, hal_write, hal_output, hal_belt};

static void all_pins_off() {
    for (size_t i = 0; i < N_OUTPUT_PINS; i++) {
        gpio_init(OUTPUT_PINS[i].pin);
        gpio_set_dir(OUTPUT_PINS[i].pin, GPIO_OUT);
        gpio_put(OUTPUT_PINS[i].pin, 0);
    }
}

static void poll_estop(uint64_t now_us) {
    bool level = digitalRead(PIN_ESTOP) == HIGH; /* HIGH = pressed or wire broken = stop */
    if (level != g_estop_candidate) {
        g_estop_candidate = level;
        g_estop_since_us = now_us;
    }
    if (level == g_estop_level) return;
    /* Pressing acts at once (safe direction); releasing must be stable for 5 ms. */
    if (level || now_us - g_estop_since_us >= 5000) {
        g_estop_level = level;
        if (level) { /* outputs off now, before the core even runs */
            noInterrupts();
            g_armed = false;
            interrupts();
            all_pins_off();
            gpio_put(PIN_BELT, 0);
        }
        kz_set_estop(&g_mcu, level, now_us);
    }
}

void setup() {
    all_pins_off();
    gpio_init(PIN_BELT); /* belt stopped until the host's BeltRun(1) */
    gpio_set_dir(PIN_BELT, GPIO_OUT);
    gpio_put(PIN_BELT, 0);
    pinMode(PIN_ENC_A, INPUT_PULLUP);
    pinMode(PIN_ENC_B, INPUT_PULLUP);
    pinMode(PIN_ESTOP, INPUT_PULLUP);
    Serial.begin(BAUD);
    g_enc_state = (uint8_t)((gpio_get(PIN_ENC_A) ? 2 : 0) | (gpio_get(PIN_ENC_B) ? 1 : 0));
    attachInterrupt(digitalPinToInterrupt(PIN_ENC_A), encoder_isr, CHANGE);
    attachInterrupt(digitalPinToInterrupt(PIN_ENC_B), encoder_isr, CHANGE);
    for (size_t i = 0; i < N_INPUT_PINS; i++) {
        pinMode(INPUT_PINS[i].pin, INPUT_PULLUP);
        attachInterruptParam(digitalPinToInterrupt(INPUT_PINS[i].pin), gate_isr, CHANGE, (void *)(uintptr_t)i);
    }
    g_estop_level = g_estop_candidate = digitalRead(PIN_ESTOP) == HIGH;
    uint32_t boot_id = rp2040.hwrand32();
    kz_init(&g_mcu, &HAL, boot_id ? boot_id : 1u, time_us_64(), g_estop_level);
    rp2040.wdt_begin(100); /* a hung loop resets the chip: outputs off */
}

void loop() {
    static uint8_t buf[128];
    rp2040.wdt_reset();
    uint64_t now = time_us_64();
    poll_estop(now);

    /* 1. Disarm the compare, so nothing fires from a stale copy while the core changes its queue. */
    noInterrupts();
    g_armed = false;
    bool isr_fired = g_isr_fired;
    int64_t isr_count = g_isr_fired_count;
    g_isr_fired = false;
    interrupts();

    /* 2. Let the core fire what is due (including what the ISR already switched on) before reading
     *    the host, so a Cancel can never "cancel" a command whose valve is already open. */
    int64_t count = read_count();
    if (isr_fired && isr_count > count) count = isr_count; /* encoder jitter backwards: still fire it */
    kz_poll(&g_mcu, now, count);

    /* 2a. Input edges the pin ISR stamped (InputEdge events, if the host's GateSetup asks for them). */
    for (;;) {
        noInterrupts();
        if (g_edge_len == 0) {
            interrupts();
            break;
        }
        EdgeRec e;
        e.input = g_edges[g_edge_head].input;
        e.rising = g_edges[g_edge_head].rising;
        e.count = g_edges[g_edge_head].count;
        e.t_us = g_edges[g_edge_head].t_us;
        g_edge_head = (uint8_t)((g_edge_head + 1) % EDGE_RING);
        g_edge_len--;
        interrupts();
        kz_input_edge(&g_mcu, e.input, e.rising, e.count, e.t_us, now);
    }

    /* 3. Host bytes. */
    int avail = Serial.available();
    while (avail > 0) {
        int n = Serial.readBytes(buf, avail < (int)sizeof buf ? avail : (int)sizeof buf);
        if (n <= 0) break;
        kz_rx_bytes(&g_mcu, buf, (size_t)n, time_us_64(), read_count());
        avail = Serial.available();
    }

    /* 4. Publish the next compare. */
    int64_t on_count;
    uint8_t diverter;
    if (!g_estop_level && kz_next_on_count(&g_mcu, &on_count, &diverter)) {
        int8_t pin = pin_for(diverter);
        noInterrupts();
        g_armed_on_count = on_count;
        g_armed_pin = pin;
        g_armed = true;
        interrupts();
    }
}
