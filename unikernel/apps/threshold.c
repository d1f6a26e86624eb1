/*
 * threshold: an alert per reading above a threshold, per device. Event
 * mode; it answers only the inputs that raise an alert (most inputs have
 * no output), as a real alerting service does.
 *
 * Input payload: {"device": "<id>" (default: the input's source),
 *                 "value": <number> (default 0)}
 * Output (only when value > threshold):
 *         {"device", "value", "threshold", "alerts"}
 * Store: "alerts/<device>" int64 (alerts raised), "seen/<device>" int64.
 */

#include "ferry.h"

static void on_input(void)
{
    char alerts_key[FERRY_KEY_MAX + 1], seen_key[FERRY_KEY_MAX + 1];
    const char *device = ferry_input_str("device", ferry_input_source());
    double value = ferry_input_f64("value", 0.0);
    double threshold = ferry_param_f64("threshold", 0); /* declared below */
    int64_t alerts;

    ferry_key(alerts_key, "alerts/", device);
    ferry_key(seen_key, "seen/", device);
    if (ferry_set_i64(seen_key, ferry_get_i64(seen_key, 0) + 1) != FERRY_OK)
        ferry_fail("threshold: cannot update the store");
    if (!(value > threshold))
        return;
    alerts = ferry_get_i64(alerts_key, 0) + 1;
    if (ferry_set_i64(alerts_key, alerts) != FERRY_OK)
        ferry_fail("threshold: cannot update the store");
    ferry_out_str("device", device);
    ferry_out_f64("value", value);
    ferry_out_f64("threshold", threshold);
    ferry_out_i64("alerts", alerts);
    ferry_emit();
}

static const struct ferry_param params[] = {
    FERRY_PARAM_F64("threshold", 25.0, "a reading above it raises an alert"),
    FERRY_PARAMS_END,
};

const struct ferry_app ferry_app = {
    .name = "threshold",
    .version = "1.0.0",
    .mode = FERRY_MODE_EVENT,
    .on_input = on_input,
    .params = params,
};
