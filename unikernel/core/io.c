/* io.c: parameters, the current input, outputs, logging and failure of
 * ferry.h. */
#include <string.h>

#include "../include/ferry.h"
#include "../platform/platform.h"
#include "codec.h"
#include "frame.h"
#include "runtime.h"

/* ----------------------------------------------------- scalar lookups */

static int64_t map_i64(const struct kv *m, const char *key, int64_t dflt)
{
    const struct kv_value *v = kv_find(m, key);
    return (v && v->type == KV_INT64) ? v->u.i : dflt;
}

static double map_f64(const struct kv *m, const char *key, double dflt)
{
    const struct kv_value *v = kv_find(m, key);

    if (v && v->type == KV_FLOAT64)
        return v->u.f;
    if (v && v->type == KV_INT64)
        return (double)v->u.i;
    return dflt;
}

static bool map_bool(const struct kv *m, const char *key, bool dflt)
{
    const struct kv_value *v = kv_find(m, key);
    return (v && v->type == KV_BOOL) ? v->u.b : dflt;
}

static const char *map_str(const struct kv *m, const char *key, const char *dflt)
{
    const struct kv_value *v = kv_find(m, key);
    return (v && v->type == KV_STRING) ? v->u.arr.p : dflt;
}

/* The app's declaration of parameter (key), or NULL. */
static const struct ferry_param *declared(const char *key)
{
    const struct ferry_param *p = rt.app->params;

    for (; key != NULL && p != NULL && p->name != NULL; p++)
        if (strcmp(p->name, key) == 0)
            return p;
    return NULL;
}

int64_t ferry_param_i64(const char *key, int64_t dflt)
{
    const struct ferry_param *p = declared(key);

    if (p != NULL && p->type == FERRY_PARAM_TYPE_I64)
        dflt = p->dflt.i64;
    return map_i64(&rt.st.params, key, dflt);
}

double ferry_param_f64(const char *key, double dflt)
{
    const struct ferry_param *p = declared(key);

    if (p != NULL && p->type == FERRY_PARAM_TYPE_F64)
        dflt = p->dflt.f64;
    else if (p != NULL && p->type == FERRY_PARAM_TYPE_I64)
        dflt = (double)p->dflt.i64;
    return map_f64(&rt.st.params, key, dflt);
}

bool ferry_param_bool(const char *key, bool dflt)
{
    const struct ferry_param *p = declared(key);

    if (p != NULL && p->type == FERRY_PARAM_TYPE_BOOL)
        dflt = p->dflt.b;
    return map_bool(&rt.st.params, key, dflt);
}

const char *ferry_param_str(const char *key, const char *dflt)
{
    const struct ferry_param *p = declared(key);

    if (p != NULL && p->type == FERRY_PARAM_TYPE_STR)
        dflt = p->dflt.str;
    return map_str(&rt.st.params, key, dflt);
}

const char *ferry_input_source(void)
{
    return rt.in_input ? rt.input_source : "";
}

int64_t ferry_input_seq(void)
{
    return rt.in_input ? rt.input_seq : 0;
}

int64_t ferry_input_i64(const char *key, int64_t dflt) { return map_i64(&rt.input_payload, key, dflt); }
double ferry_input_f64(const char *key, double dflt) { return map_f64(&rt.input_payload, key, dflt); }
bool ferry_input_bool(const char *key, bool dflt) { return map_bool(&rt.input_payload, key, dflt); }
const char *ferry_input_str(const char *key, const char *dflt) { return map_str(&rt.input_payload, key, dflt); }

bool ferry_input_has(const char *key)
{
    return kv_find(&rt.input_payload, key) != NULL;
}

/* -------------------------------------------------------------- outputs */

static ferry_result_t out_key(const char *key)
{
    if (key == NULL || !kv_key_valid(key, strlen(key)))
        return FERRY_EINVAL;
    if (!rt.out_open)
        rt_out_reset();
    jw_key(&rt.out, key);
    return rt.out.failed ? FERRY_ENOMEM : FERRY_OK;
}

ferry_result_t ferry_out_i64(const char *key, int64_t value)
{
    ferry_result_t r = out_key(key);

    if (r == FERRY_OK)
        jw_i64(&rt.out, value);
    return r;
}

ferry_result_t ferry_out_f64(const char *key, double value)
{
    ferry_result_t r = out_key(key);

    if (r == FERRY_OK)
        jw_f64(&rt.out, value);
    return r;
}

ferry_result_t ferry_out_bool(const char *key, bool value)
{
    ferry_result_t r = out_key(key);

    if (r == FERRY_OK)
        jw_bool(&rt.out, value);
    return r;
}

ferry_result_t ferry_out_str(const char *key, const char *value)
{
    ferry_result_t r;

    if (value == NULL || !utf8_valid(value, strlen(value)))
        return FERRY_EINVAL;
    r = out_key(key);
    if (r == FERRY_OK)
        jw_str(&rt.out, value);
    return r;
}

ferry_result_t ferry_emit(void)
{
    struct jw w;

    if (rt.in_upgrade)
        return FERRY_EINVAL;   /* an upgrade hook has no input to answer */
    if (!rt.out_open)
        rt_out_reset();
    jw_obj_end(&rt.out);
    if (rt.out.failed) {
        rt_out_reset();
        return FERRY_ENOMEM;
    }
    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "source");
    if (rt.in_input)
        jw_str(&w, rt.input_source);
    else
        jw_null(&w);
    jw_key(&w, "seq");
    if (rt.in_input)
        jw_i64(&w, rt.input_seq);
    else
        jw_null(&w);
    jw_key(&w, "payload");
    jw_raw_value(&w, rt.out.buf, rt.out.len);
    jw_obj_end(&w);
    rt_out_reset();
    rt_send(FRAME_OUTPUT, &w);
    return FERRY_OK;
}

/* ----------------------------------------------- pacing, logging, failure */

void ferry_defer_next_step(uint32_t ms)
{
    if (rt.app->mode != FERRY_MODE_PROCEDURAL || ms == 0)
        return;
    rt.defer_until_ns = plat_monotonic_ns() + (unsigned long long)ms * 1000000ULL;
}

static const char *level_name(ferry_log_level_t level)
{
    switch (level) {
    case FERRY_LOG_DEBUG: return "debug";
    case FERRY_LOG_INFO: return "info";
    case FERRY_LOG_WARN: return "warn";
    default: return "error";
    }
}

/* Longest LOG message sent; longer ones are cut. */
#define LOG_MAX 4096

void ferry_log(ferry_log_level_t level, const char *msg)
{
    char clean[LOG_MAX];
    size_t n = 0;
    struct jw w;

    if (msg == NULL)
        msg = "(null)";
    /* Keep valid UTF-8 sequences, replace every other byte by '?'. */
    for (size_t i = 0; msg[i] != '\0' && n < LOG_MAX;) {
        size_t k = 1;
        while (k < 4 && msg[i + k] != '\0' && !utf8_valid(msg + i, k))
            k++;
        if (utf8_valid(msg + i, k) && n + k <= LOG_MAX) {
            memcpy(clean + n, msg + i, k);
            n += k;
            i += k;
        } else {
            clean[n++] = '?';
            i++;
        }
    }
    plat_console(clean, n);
    plat_console("\n", 1);
    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "level");
    jw_str(&w, level_name(level));
    jw_key(&w, "msg");
    jw_str_n(&w, clean, n);
    jw_obj_end(&w);
    rt_send(FRAME_LOG, &w);
}

void ferry_fail(const char *msg)
{
    rt_fatal("app_failed", msg ? msg : "the app failed", RT_EXIT_APP_FAILED);
}
