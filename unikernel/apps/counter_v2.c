/*
 * counter_v2: version 2.0.0 of the app "counter" (apps/counter.c is
 * 1.0.0), the example of an upgrade. It also keeps the exact sum of each
 * device's values, and upgrades a running 1.0.0 service without losing its
 * state: `ferry image push counter --build counter_v2`, then
 * `ferry upgrade SERVICE` (unikernel/GUIDE.md, "Upgrade").
 *
 * Input payload: as 1.0.0.
 * Output: {"device", "count", "mean", "total", "sum"}
 * Store: as 1.0.0, plus "sum/<device>" float64 and, after an upgrade,
 *        "upgraded_from" string (the version it came from).
 * Upgrade from 1.0.0: "sum/<device>" = mean × count for every device 1.0.0
 * knew. Refused when a sum would not be a finite float64 (readings near
 * the float64 limit): the old version then keeps serving.
 */

#include "ferry.h"

static void on_input(void)
{
    char count_key[FERRY_KEY_MAX + 1], mean_key[FERRY_KEY_MAX + 1],
        sum_key[FERRY_KEY_MAX + 1];
    const char *device = ferry_input_str("device", ferry_input_source());
    double value = ferry_input_f64("value", 0.0);
    int64_t count, total;
    double mean, sum;

    ferry_key(count_key, "count/", device);
    ferry_key(mean_key, "mean/", device);
    ferry_key(sum_key, "sum/", device);
    count = ferry_get_i64(count_key, 0) + 1;
    mean = ferry_get_f64(mean_key, 0.0);
    mean += (value - mean) / (double)count;
    sum = ferry_get_f64(sum_key, 0.0) + value;
    total = ferry_get_i64("total", 0) + 1;
    if (ferry_set_i64(count_key, count) != FERRY_OK ||
        ferry_set_f64(mean_key, mean) != FERRY_OK ||
        ferry_set_f64(sum_key, sum) != FERRY_OK ||
        ferry_set_i64("total", total) != FERRY_OK)
        ferry_fail("counter: cannot update the store");

    ferry_out_str("device", device);
    ferry_out_i64("count", count);
    ferry_out_f64("mean", mean);
    ferry_out_i64("total", total);
    ferry_out_f64("sum", sum);
    ferry_emit();
}

/* 1.0.0 kept count and mean per device: derive the sum of each. */
static const char *upgrade(const char *from_version)
{
    char key[FERRY_KEY_MAX + 1] = "", mean_key[FERRY_KEY_MAX + 1],
        sum_key[FERRY_KEY_MAX + 1];
    const char *next;
    const size_t prefix = sizeof("count/") - 1;

    while ((next = ferry_next_key("count/", key)) != NULL) {
        double sum;

        ferry_key(key, "", next);
        ferry_key(mean_key, "mean/", key + prefix);
        ferry_key(sum_key, "sum/", key + prefix);
        sum = ferry_get_f64(mean_key, 0.0) * (double)ferry_get_i64(key, 0);
        if (sum != sum || sum - sum != 0.0)   /* NaN or infinite */
            return "a device's sum of readings is beyond a float64";
        if (ferry_set_f64(sum_key, sum) != FERRY_OK)
            return "out of memory for the sums";
    }
    if (ferry_set_str("upgraded_from", from_version) != FERRY_OK)
        return "out of memory";
    return NULL;
}

static const struct ferry_param no_params[] = {FERRY_PARAMS_END};

const struct ferry_app ferry_app = {
    .name = "counter",
    .version = "2.0.0",
    .mode = FERRY_MODE_EVENT,
    .on_input = on_input,
    .params = no_params,
    .upgrades_from = "1.0.0",
    .upgrade = upgrade,
};
