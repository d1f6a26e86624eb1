/*
 * aggregator: per-sensor sliding-window statistics with threshold alerts.
 * Event mode; one OUTPUT per applied input, deterministic (no clock).
 *
 * Params: declared in `params` below (window, threshold, ballast_kb,
 *         history_sensors); `ferry image show aggregator` lists them.
 * Input payload: {"sensor": "<id>" (default: the input's source),
 *                 "value": <number>}
 * Output: {"sensor", "n", "mean", "min", "max", "stddev", "alert",
 *          "alerts"}; alert is true when the window mean exceeds the
 *          threshold.
 * Store per sensor: "win/<s>" float64 list of `window` samples (a ring),
 * "head/<s>" next slot, "n/<s>" samples seen, "alerts/<s>" alert count.
 * State grows with window x sensors: 8 bytes per sample.
 *
 * Ballast: a fresh START allocates `ballast_kb` KiB and fills it with
 * pseudo-random (incompressible) bytes that are NOT in the store. It stands
 * for the heap of a typical service (libraries, buffers, caches): a memory
 * image (CRIU, a VM snapshot) must carry it, an app-level checkpoint does
 * not. The benchmark uses it to give the app a realistic footprint. It is
 * not rebuilt after a RESTORE (nothing of the app needs it).
 *
 * History: a fresh START with history_sensors = N fills the windows of
 * sensors "dev-1".."dev-N" (the simulator's producer names) with plausible
 * readings (15.00..30.00), as if the service had been running for a while.
 * That state IS in the store: it is what a long-running aggregator carries,
 * and what a checkpoint must move (the benchmark sweeps its size with it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.h"

/* Newton's method: no libm on every target. */
static double square_root(double v)
{
    double x;

    if (!(v > 0.0))
        return 0.0;
    x = v >= 1.0 ? v : 1.0;
    for (int i = 0; i < 200; i++) {
        double next = 0.5 * (x + v / x);
        if (next >= x)
            break;
        x = next;
    }
    return x;
}

static void must(ferry_result_t r)
{
    if (r != FERRY_OK)
        ferry_fail("aggregator: cannot update the store");
}

/* Kept reachable so the compiler cannot drop the allocation or its fill. */
static volatile uint64_t *ballast;

static uint64_t xorshift(uint64_t *x)
{
    /* xorshift64: fast, deterministic, and its output does not compress. */
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void fill_history(void)
{
    int64_t sensors = ferry_param_i64("history_sensors", 0);
    int64_t window = ferry_param_i64("window", 0);
    uint64_t x = 0x2545f4914f6cdd1dULL;
    char name[32], key[FERRY_KEY_MAX + 1];

    if (sensors < 0 || sensors > 1024)
        ferry_fail("aggregator: history_sensors must be 0..1024");
    if (window < 1 || window > 4194304)
        ferry_fail("aggregator: window must be 1..4194304");
    for (int64_t s = 1; s <= sensors; s++) {
        double *win;
        int64_t len = 0;
        char digits[24];

        for (int64_t v = s; v > 0; v /= 10)
            digits[len++] = (char)('0' + v % 10);
        memcpy(name, "dev-", 4);
        for (int64_t i = 0; i < len; i++)
            name[4 + i] = digits[len - 1 - i];
        name[4 + len] = '\0';
        win = ferry_f64_list_mut(ferry_key(key, "win/", name), (size_t)window);
        if (win == NULL)
            ferry_fail("aggregator: out of memory");
        for (int64_t i = 0; i < window; i++)
            win[i] = 15.0 + (double)(xorshift(&x) % 1501) / 100.0;
        must(ferry_set_i64(ferry_key(key, "head/", name), 0));
        must(ferry_set_i64(ferry_key(key, "n/", name), window));
    }
}

static void on_start(void)
{
    int64_t kb = ferry_param_i64("ballast_kb", 0);
    size_t words;
    uint64_t x = 0x9e3779b97f4a7c15ULL;

    fill_history();
    if (kb < 0 || kb > 1048576)
        ferry_fail("aggregator: ballast_kb must be 0..1048576");
    if (kb == 0)
        return;
    words = (size_t)kb * 1024 / sizeof(uint64_t);
    ballast = malloc(words * sizeof(uint64_t));
    if (ballast == NULL)
        ferry_fail("aggregator: cannot allocate the ballast");
    for (size_t i = 0; i < words; i++)
        ballast[i] = xorshift(&x);
}

static void on_input(void)
{
    char win_key[FERRY_KEY_MAX + 1], head_key[FERRY_KEY_MAX + 1],
         n_key[FERRY_KEY_MAX + 1], alerts_key[FERRY_KEY_MAX + 1];
    const char *sensor = ferry_input_str("sensor", ferry_input_source());
    double value = ferry_input_f64("value", 0.0);
    int64_t window = ferry_param_i64("window", 0);
    double threshold = ferry_param_f64("threshold", 0);
    int64_t head, seen, alerts, filled;
    double *win, sum = 0.0, sq = 0.0, lo, hi, mean, var;
    bool alert;

    if (window < 1 || window > 4194304)
        ferry_fail("aggregator: window must be 1..4194304");
    ferry_key(win_key, "win/", sensor);
    ferry_key(head_key, "head/", sensor);
    ferry_key(n_key, "n/", sensor);
    ferry_key(alerts_key, "alerts/", sensor);

    win = ferry_f64_list_mut(win_key, (size_t)window);
    if (win == NULL)
        ferry_fail("aggregator: out of memory");
    head = ferry_get_i64(head_key, 0);
    if (head < 0 || head >= window)
        head = 0;
    seen = ferry_get_i64(n_key, 0) + 1;
    win[head] = value;
    head = (head + 1) % window;
    filled = seen < window ? seen : window;

    /* The newest `filled` samples end just before `head`. */
    lo = hi = value;
    for (int64_t i = 0; i < filled; i++) {
        double s = win[(head - 1 - i + window) % window];
        sum += s;
        if (s < lo)
            lo = s;
        if (s > hi)
            hi = s;
    }
    mean = sum / (double)filled;
    for (int64_t i = 0; i < filled; i++) {
        double d = win[(head - 1 - i + window) % window] - mean;
        sq += d * d;
    }
    var = sq / (double)filled;
    alert = mean > threshold;
    alerts = ferry_get_i64(alerts_key, 0) + (alert ? 1 : 0);

    must(ferry_set_i64(head_key, head));
    must(ferry_set_i64(n_key, seen));
    must(ferry_set_i64(alerts_key, alerts));

    ferry_out_str("sensor", sensor);
    ferry_out_i64("n", seen);
    ferry_out_f64("mean", mean);
    ferry_out_f64("min", lo);
    ferry_out_f64("max", hi);
    ferry_out_f64("stddev", square_root(var));
    ferry_out_bool("alert", alert);
    ferry_out_i64("alerts", alerts);
    ferry_emit();
}

static const struct ferry_param params[] = {
    FERRY_PARAM_I64("window", 64, "samples kept per sensor, 1..4194304"),
    FERRY_PARAM_F64("threshold", 100.0, "alert when the window mean exceeds it"),
    FERRY_PARAM_I64("ballast_kb", 0,
                    "KiB of heap outside the store (a realistic footprint), 0..1048576"),
    FERRY_PARAM_I64("history_sensors", 0,
                    "sensors dev-1..dev-N whose windows start full, 0..1024"),
    FERRY_PARAMS_END,
};

const struct ferry_app ferry_app = {
    .name = "aggregator",
    .version = "1.0.0",
    .mode = FERRY_MODE_EVENT,
    .on_start = on_start,
    .on_input = on_input,
    .params = params,
};
