/*
 * procedural: a multi-stage computation written as named steps with
 * data-dependent transitions, to show (and test) that a procedural app
 * resumes at the right step after a migration.
 *
 *   init -> generate -> transform -> (square | halve) -> reduce
 *        -> generate ... (until `rounds` rounds) -> finish
 *
 * Params: declared in `params` below (rounds, seed, size, step_delay_ms).
 * Every step emits one output {"step", "round", ...}; the app sends
 * FINISHED after "finish".
 */
#include "ferry.h"

#define MODULUS 1000000007LL

static void pace(void)
{
    int64_t ms = ferry_param_i64("step_delay_ms", 0);

    if (ms > 0)
        ferry_defer_next_step(ms > 600000 ? 600000u : (uint32_t)ms);
}

static void out_step(const char *name)
{
    ferry_out_str("step", name);
    ferry_out_i64("round", ferry_get_i64("round", 0));
}

static void must(ferry_result_t r)
{
    if (r != FERRY_OK)
        ferry_fail("procedural: cannot update the store");
}

static const char *step_init(void)
{
    int64_t size = ferry_param_i64("size", 0);

    if (size < 1 || size > 4096)
        ferry_fail("procedural: size must be 1..4096");
    must(ferry_set_i64("round", 0));
    must(ferry_set_i64("x", ferry_param_i64("seed", 0)));
    must(ferry_set_i64("acc", 0));
    must(ferry_set_f64("avg", 0.0));
    out_step("init");
    ferry_emit();
    pace();
    return "generate";
}

static const char *step_generate(void)
{
    size_t n = (size_t)ferry_param_i64("size", 0);
    uint64_t x = (uint64_t)ferry_get_i64("x", 1);
    int64_t *data = ferry_i64_list_mut("data", n);

    if (data == NULL)
        ferry_fail("procedural: out of memory");
    for (size_t i = 0; i < n; i++) {
        /* A 64-bit LCG (Knuth's MMIX constants), reduced to [0, MODULUS). */
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        data[i] = (int64_t)((x >> 33) % (uint64_t)MODULUS);
    }
    must(ferry_set_i64("x", (int64_t)x));
    out_step("generate");
    ferry_out_i64("first", data[0]);
    ferry_emit();
    pace();
    return "transform";
}

static const char *step_transform(void)
{
    size_t n;
    const int64_t *data = ferry_get_i64_list("data", &n);
    int64_t sum = 0;

    for (size_t i = 0; i < n; i++)
        sum = (sum + data[i]) % MODULUS;
    out_step("transform");
    ferry_out_i64("sum", sum);
    ferry_emit();
    pace();
    return (sum % 2 == 0) ? "square" : "halve";
}

static const char *step_square(void)
{
    size_t n;
    int64_t *data;

    ferry_get_i64_list("data", &n);
    data = ferry_i64_list_mut("data", n);
    if (data == NULL)
        ferry_fail("procedural: out of memory");
    for (size_t i = 0; i < n; i++)
        data[i] = (data[i] * data[i]) % MODULUS;
    out_step("square");
    ferry_emit();
    pace();
    return "reduce";
}

static const char *step_halve(void)
{
    size_t n;
    int64_t *data;

    ferry_get_i64_list("data", &n);
    data = ferry_i64_list_mut("data", n);
    if (data == NULL)
        ferry_fail("procedural: out of memory");
    for (size_t i = 0; i < n; i++)
        data[i] /= 2;
    out_step("halve");
    ferry_emit();
    pace();
    return "reduce";
}

static const char *step_reduce(void)
{
    size_t n;
    const int64_t *data = ferry_get_i64_list("data", &n);
    int64_t acc = ferry_get_i64("acc", 0);
    int64_t round = ferry_get_i64("round", 0) + 1;
    double total = 0.0;

    for (size_t i = 0; i < n; i++) {
        acc = (acc + data[i]) % MODULUS;
        total += (double)data[i];
    }
    must(ferry_set_i64("acc", acc));
    must(ferry_set_f64("avg", n ? total / (double)n : 0.0));
    must(ferry_set_i64("round", round));
    out_step("reduce");
    ferry_out_i64("acc", acc);
    ferry_out_f64("avg", ferry_get_f64("avg", 0.0));
    ferry_emit();
    pace();
    return round < ferry_param_i64("rounds", 0) ? "generate" : "finish";
}

static const char *step_finish(void)
{
    out_step("finish");
    ferry_out_i64("acc", ferry_get_i64("acc", 0));
    ferry_emit();
    must(ferry_del("data"));
    return NULL;
}

static const struct ferry_step steps[] = {
    {"init", step_init},
    {"generate", step_generate},
    {"transform", step_transform},
    {"square", step_square},
    {"halve", step_halve},
    {"reduce", step_reduce},
    {"finish", step_finish},
    {NULL, NULL},
};

static const struct ferry_param params[] = {
    FERRY_PARAM_I64("rounds", 5, "rounds of generate..reduce before finish"),
    FERRY_PARAM_I64("seed", 1, "seed of the generated data"),
    FERRY_PARAM_I64("size", 16, "list length, 1..4096"),
    FERRY_PARAM_I64("step_delay_ms", 0, "pause between steps (0..600000 ms)"),
    FERRY_PARAMS_END,
};

const struct ferry_app ferry_app = {
    .name = "procedural",
    .version = "1.0.0",
    .mode = FERRY_MODE_PROCEDURAL,
    .steps = steps,
    .first_step = "init",
    .params = params,
};
