/*
 * host_main.c: the Kozan MCU protocol core (kozan_mcu.c) on Linux, on the far end of a pseudo-terminal.
 *
 * Why: the host link (firmware_bridge/link.py) and the conformance/fault tests then exercise the very C
 * code that is flashed onto the board, through a real tty, exactly like the Python simulator.
 *
 * Usage:
 *   kozan_mcu_host [--fd N] [--speed COUNTS_PER_S] [--seed N]
 *     --fd N       serve on an already open pty master fd N (inherited); default: create a pty and print
 *                  "pty <slave path>" as the first stdout line.
 *     --speed S    real-time belt: MCU time = CLOCK_MONOTONIC since start, count = floor(t * S).
 *                  Without it the world is manual: time and count change only by control commands.
 *     --seed N     seed for boot ids (default: /dev/urandom).
 *
 * Control channel (stdin lines -> stdout lines), so tests drive the world deterministically:
 *   set COUNT TIME_US   move the manual belt/clock, run one service pass        -> "ok"
 *   sync                run one service pass (after reading the pty)            -> "ok"
 *   estop 0|1           release/press the e-stop input                          -> "ok"
 *   edge INPUT 0|1      digital input INPUT falls (0) / rises (1) now: kz_input_edge() stamped with the
 *                       world's count and time, as the board's pin ISR does, then one service pass -> "ok"
 *   reset               power-cycle the core (new boot id, Hello)               -> "ok"
 *   drop TYPE N         drop the next N valid host frames of msg type TYPE      -> "ok"
 *   replug              the cable is pulled and re-plugged: the core runs on (no reset), its port moves
 *                       to a new pty and the old one closes (the host's reads fail) -> "ok <new slave path>"
 *   state               -> "state boot=.. configured=.. queue=.. estop=.. tripped=.. count=.. time=..
 *                           rate_dc=.. rate_dt=.. frames_rx=.. crc_errors=.. malformed=.. fired=.. tx_dropped=..
 *                           faults=.. events_pending=.. events_dropped=.. watchdog_trips=..
 *                           wd_last_rx=.. wd_prev_poll=.. wd_trip=.. wd_frames_rx=.. armed=.. belt=.."
 *                       (faults and watchdog_trips count every boot since the process started; the wd_
 *                       fields describe the latest watchdog trip on the MCU clock: the last host frame's
 *                       time, the service pass before the trip, the trip, and frames_rx then; 0 if none)
 *   quit                exit 0 (EOF on stdin too)
 * Asynchronous lines, whenever an output switches:
 *   act on DIVERTER ON_COUNT PULSE_MS COMMAND_ID TIME_US COUNT_NOW
 *   act off DIVERTER TIME_US COUNT_NOW
 *   act belt RUN TIME_US COUNT_NOW      (the belt-run output: 1 run, 0 stop)
 * Anything else on stdout starts with "err " and says what was wrong with the control line.
 */
#define _XOPEN_SOURCE 600
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "kozan_mcu.h"

#define TX_LIMIT (64u * 1024u)
#define CTL_LINE_MAX 256

static kz_mcu_t g_mcu;
static uint8_t g_tx[TX_LIMIT];
static size_t g_tx_len;
static unsigned long g_tx_dropped;
static int g_fd = -1;
static int g_estop;
static int g_manual = 1;
static double g_speed;
static struct timespec g_t0;
static uint64_t g_time_us;
static int64_t g_count;
static uint32_t g_rng;
static uint32_t g_faults_before; /* faults / watchdog trips of earlier boots, so `state` counts them all */
static uint32_t g_trips_before;
static uint64_t g_prev_poll_us; /* MCU time of the last kz_poll */
static uint64_t g_wd_last_rx_us, g_wd_prev_poll_us, g_wd_trip_us; /* the latest watchdog trip */
static uint32_t g_wd_frames_rx;

static void now_world(uint64_t *t_us, int64_t *count) {
    if (!g_manual) {
        struct timespec ts;
        double dt;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        dt = (double)(ts.tv_sec - g_t0.tv_sec) + (double)(ts.tv_nsec - g_t0.tv_nsec) * 1e-9;
        g_time_us = (uint64_t)(dt * 1e6);
        g_count = (int64_t)(dt * g_speed); /* floor for a forward belt */
    }
    *t_us = g_time_us;
    *count = g_count;
}

static void flush_tx(void) {
    while (g_tx_len > 0) {
        ssize_t n = write(g_fd, g_tx, g_tx_len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            /* EIO: nobody has the slave open. Behave like a UART with no listener. */
            g_tx_dropped += g_tx_len;
            g_tx_len = 0;
            return;
        }
        memmove(g_tx, g_tx + n, g_tx_len - (size_t)n);
        g_tx_len -= (size_t)n;
    }
}

static void hal_write(void *ctx, const uint8_t *data, size_t len) {
    (void)ctx;
    if (g_tx_len + len > TX_LIMIT) { /* nobody reads: drop the backlog, as the simulator does */
        g_tx_dropped += g_tx_len;
        g_tx_len = 0;
    }
    memcpy(g_tx + g_tx_len, data, len);
    g_tx_len += len;
    flush_tx();
}

static void hal_output(void *ctx, uint8_t diverter, int on, int64_t on_count, uint16_t pulse_ms, uint32_t id) {
    uint64_t t;
    int64_t c;
    (void)ctx;
    now_world(&t, &c);
    if (on)
        printf("act on %u %" PRId64 " %u %" PRIu32 " %" PRIu64 " %" PRId64 "\n", diverter, on_count, pulse_ms, id,
               t, c);
    else
        printf("act off %u %" PRIu64 " %" PRId64 "\n", diverter, t, c);
}

static void hal_belt(void *ctx, int run) {
    uint64_t t;
    int64_t c;
    (void)ctx;
    now_world(&t, &c);
    printf("act belt %d %" PRIu64 " %" PRId64 "\n", run ? 1 : 0, t, c);
}

static const kz_hal_t g_hal = {NULL, hal_write, hal_output, hal_belt};
static int g_slave_fd = -1;

static uint32_t next_boot_id(void) {
    uint32_t id;
    do { /* xorshift32 */
        g_rng ^= g_rng << 13;
        g_rng ^= g_rng >> 17;
        g_rng ^= g_rng << 5;
        id = g_rng;
    } while (id == 0);
    return id;
}

static void power_on(void) {
    uint64_t t;
    int64_t c;
    uint8_t i;
    for (i = 0; i < g_mcu.n_outputs; i++) /* a reset drops every output (pins float to off) */
        if (g_mcu.outputs[i].on) hal_output(NULL, g_mcu.outputs[i].id, 0, 0, 0, 0);
    if (g_mcu.belt_running) hal_belt(NULL, 0);
    now_world(&t, &c);
    g_faults_before += g_mcu.faults;
    g_trips_before += g_mcu.watchdog_trips;
    kz_init(&g_mcu, &g_hal, next_boot_id(), t, g_estop);
    g_prev_poll_us = t;
}

static void service_pass(void) {
    uint8_t buf[4096];
    uint64_t t;
    int64_t c;
    uint32_t trips;
    for (;;) {
        ssize_t n = read(g_fd, buf, sizeof buf);
        if (n <= 0) break; /* EAGAIN: drained; EIO: no slave opener yet */
        now_world(&t, &c);
        kz_rx_bytes(&g_mcu, buf, (size_t)n, t, c);
        if ((size_t)n < sizeof buf) break;
    }
    now_world(&t, &c);
    trips = g_mcu.watchdog_trips;
    kz_poll(&g_mcu, t, c);
    if (g_mcu.watchdog_trips != trips) { /* record it on the MCU clock, for the real-time tests */
        g_wd_last_rx_us = g_mcu.last_host_rx_us;
        g_wd_prev_poll_us = g_prev_poll_us;
        g_wd_trip_us = t;
        g_wd_frames_rx = g_mcu.frames_rx;
    }
    g_prev_poll_us = t;
    flush_tx();
}

static int open_pty(const char **slave_path, int *slave_fd) {
    struct termios tio;
    int fd = posix_openpt(O_RDWR | O_NOCTTY);
    if (fd < 0 || grantpt(fd) != 0 || unlockpt(fd) != 0) return -1;
    *slave_path = ptsname(fd);
    if (*slave_path == NULL) return -1;
    /* Keep the slave open ourselves: a pty with no slave opener returns EIO on the master. */
    *slave_fd = open(*slave_path, O_RDWR | O_NOCTTY);
    if (*slave_fd < 0) return -1;
    if (tcgetattr(*slave_fd, &tio) == 0) { /* raw, 8-bit clean, no echo */
        tio.c_iflag &= ~(tcflag_t)(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
        tio.c_oflag &= ~(tcflag_t)OPOST;
        tio.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
        tio.c_cflag &= ~(tcflag_t)(CSIZE | PARENB);
        tio.c_cflag |= CS8;
        tcsetattr(*slave_fd, TCSANOW, &tio);
    }
    return fd;
}

/* Returns 0 to go on, 1 to quit. */
static int handle_control(char *line) {
    char cmd[16];
    long long a = 0, b = 0;
    int n = sscanf(line, "%15s %lld %lld", cmd, &a, &b);
    if (n < 1) return 0;
    if (strcmp(cmd, "quit") == 0) return 1;
    if (strcmp(cmd, "set") == 0) {
        if (n != 3 || !g_manual || b < 0) {
            printf("err set needs COUNT TIME_US (TIME_US >= 0) and a manual world (no --speed)\n");
            return 0;
        }
        g_count = (int64_t)a;
        g_time_us = (uint64_t)b;
    } else if (strcmp(cmd, "estop") == 0 && n == 2) {
        uint64_t t;
        int64_t c;
        g_estop = a != 0;
        now_world(&t, &c);
        kz_set_estop(&g_mcu, g_estop, t);
    } else if (strcmp(cmd, "edge") == 0 && n == 3) {
        uint64_t t;
        int64_t c;
        if (a < 0 || a > 255) {
            printf("err edge needs INPUT 0..255 and 0|1\n");
            return 0;
        }
        now_world(&t, &c);
        kz_input_edge(&g_mcu, (uint8_t)a, b != 0, c, t, t);
    } else if (strcmp(cmd, "reset") == 0) {
        power_on();
    } else if (strcmp(cmd, "drop") == 0 && n == 3) {
        kz_drop_rx(&g_mcu, (uint8_t)a, (uint16_t)b);
    } else if (strcmp(cmd, "replug") == 0) {
        const char *path = NULL;
        int new_slave = -1, new_fd;
        if (g_slave_fd < 0) {
            printf("err replug needs a pty this process created (no --fd)\n");
            return 0;
        }
        new_fd = open_pty(&path, &new_slave);
        if (new_fd < 0 || fcntl(new_fd, F_SETFL, fcntl(new_fd, F_GETFL) | O_NONBLOCK) != 0) {
            printf("err replug: cannot create a pseudo-terminal: %s\n", strerror(errno));
            return 0;
        }
        close(g_slave_fd); /* the old cable: the host's end sees a hang-up */
        close(g_fd);
        g_fd = new_fd;
        g_slave_fd = new_slave;
        g_tx_len = 0; /* bytes for the old cable are gone with it */
        service_pass();
        printf("ok %s\n", path);
        return 0;
    } else if (strcmp(cmd, "state") == 0) {
        int64_t dc, dt;
        kz_rate(&g_mcu, &dc, &dt);
        printf("state boot=%" PRIu32 " configured=%d queue=%d estop=%d tripped=%d count=%" PRId64 " time=%" PRIu64
               " rate_dc=%" PRId64 " rate_dt=%" PRId64 " frames_rx=%" PRIu32 " crc_errors=%" PRIu32
               " malformed=%" PRIu32 " fired=%" PRIu32 " tx_dropped=%lu faults=%" PRIu32 " events_pending=%u"
               " events_dropped=%u watchdog_trips=%" PRIu32 " wd_last_rx=%" PRIu64 " wd_prev_poll=%" PRIu64
               " wd_trip=%" PRIu64 " wd_frames_rx=%" PRIu32 " armed=%d belt=%d\n",
               g_mcu.boot_id, g_mcu.configured, g_mcu.queue_depth, g_mcu.estop, g_mcu.tripped, g_count, g_time_us,
               dc, dt, g_mcu.frames_rx, g_mcu.crc_errors, g_mcu.malformed, g_mcu.fired, g_tx_dropped,
               g_faults_before + g_mcu.faults, (unsigned)g_mcu.event_count, (unsigned)g_mcu.events_dropped,
               g_trips_before + g_mcu.watchdog_trips, g_wd_last_rx_us, g_wd_prev_poll_us, g_wd_trip_us,
               g_wd_frames_rx, g_mcu.armed, g_mcu.belt_running);
        return 0;
    } else if (strcmp(cmd, "sync") != 0) {
        printf("err unknown control line '%s': use set/sync/estop/edge/reset/drop/replug/state/quit\n", cmd);
        return 0;
    }
    service_pass();
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv) {
    const char *slave_path = NULL;
    int i, seeded = 0;
    char ctl[CTL_LINE_MAX];
    size_t ctl_len = 0;
    int stdin_open = 1;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            g_fd = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--speed") == 0 && i + 1 < argc) {
            g_speed = strtod(argv[++i], NULL);
            g_manual = 0;
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            g_rng = (uint32_t)strtoul(argv[++i], NULL, 0);
            seeded = 1;
        } else {
            fprintf(stderr, "usage: %s [--fd PTY_MASTER_FD] [--speed COUNTS_PER_S] [--seed N]\n", argv[0]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!seeded) {
        int r = open("/dev/urandom", O_RDONLY);
        if (r < 0 || read(r, &g_rng, sizeof g_rng) != (ssize_t)sizeof g_rng) g_rng = (uint32_t)time(NULL) ^ (uint32_t)getpid();
        if (r >= 0) close(r);
    }
    if (g_rng == 0) g_rng = 0x9E3779B9u;
    if (g_fd < 0) {
        g_fd = open_pty(&slave_path, &g_slave_fd);
        if (g_fd < 0) {
            fprintf(stderr, "kozan_mcu_host: cannot create a pseudo-terminal: %s\n", strerror(errno));
            return 1;
        }
        printf("pty %s\n", slave_path);
    }
    if (fcntl(g_fd, F_SETFL, fcntl(g_fd, F_GETFL) | O_NONBLOCK) != 0) {
        fprintf(stderr, "kozan_mcu_host: fd %d is not usable (%s); pass an open pty master\n", g_fd, strerror(errno));
        return 1;
    }
    fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
    clock_gettime(CLOCK_MONOTONIC, &g_t0);
    power_on();

    for (;;) {
        struct pollfd fds[2];
        int nfds = 1;
        fds[0].fd = g_fd;
        fds[0].events = POLLIN;
        fds[1].fd = STDIN_FILENO;
        fds[1].events = POLLIN;
        if (stdin_open) nfds = 2;
        poll(fds, (nfds_t)nfds, 1); /* 1 ms: the service pass rate of the simulator */
        if (stdin_open && (fds[1].revents & (POLLIN | POLLHUP))) {
            char buf[512];
            ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
            if (n == 0) {
                if (g_manual) break; /* the driver went away: nothing can move the world any more */
                stdin_open = 0;
            }
            for (i = 0; i < n; i++) {
                if (buf[i] == '\n') {
                    ctl[ctl_len] = 0;
                    if (handle_control(ctl)) goto done;
                    ctl_len = 0;
                } else if (ctl_len + 1 < sizeof ctl) {
                    ctl[ctl_len++] = buf[i];
                }
            }
        }
        service_pass();
    }
done:
    if (g_slave_fd >= 0) close(g_slave_fd);
    close(g_fd);
    return 0;
}
