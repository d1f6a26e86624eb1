/*
 * counter: counts messages and keeps a running mean of their "value", per
 * device. Event mode; exactly one OUTPUT per applied input.
 *
 * Input payload: {"device": "<id>" (default: the input's source),
 *                 "value": <number> (default 0)}
 * Output: {"device", "count", "mean", "total"}
 * Store: "count/<device>" int64, "mean/<device>" float64, "total" int64.
 * Params: none (declared as an empty list, so deploy refuses any).
 */

#include "ferry.h"

static void on_input(void)
{
    char count_key[FERRY_KEY_MAX + 1], mean_key[FERRY_KEY_MAX + 1];
    const char *device = ferry_input_str("device", ferry_input_source());
    double value = ferry_input_f64("value", 0.0);
    int64_t count, total;
    double mean;

    ferry_key(count_key, "count/", device);
    ferry_key(mean_key, "mean/", device);
    count = ferry_get_i64(count_key, 0) + 1;
    mean = ferry_get_f64(mean_key, 0.0);
    mean += (value - mean) / (double)count;
    total = ferry_get_i64("total", 0) + 1;
    if (ferry_set_i64(count_key, count) != FERRY_OK ||
        ferry_set_f64(mean_key, mean) != FERRY_OK ||
        ferry_set_i64("total", total) != FERRY_OK)
        ferry_fail("counter: cannot update the store");

    ferry_out_str("device", device);
    ferry_out_i64("count", count);
    ferry_out_f64("mean", mean);
    ferry_out_i64("total", total);
    ferry_emit();
}

static const struct ferry_param no_params[] = {FERRY_PARAMS_END};

const struct ferry_app ferry_app = {
    .name = "counter",
    .version = "1.0.0",
    .mode = FERRY_MODE_EVENT,
    .on_input = on_input,
    .params = no_params,
};
