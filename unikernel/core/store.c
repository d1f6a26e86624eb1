/* store.c: the typed key/value store of ferry.h, over the runtime's kv. */
#include <stdlib.h>
#include <string.h>

#include "../include/ferry.h"
#include "codec.h"
#include "runtime.h"

static const struct kv_value *find_typed(const char *key, enum kv_type t)
{
    const struct kv_value *v = kv_find(&rt.st.vars, key);

    return (v != NULL && v->type == t) ? v : NULL;
}

/* Stores a scalar (no heap data); (tmp) holds type and value. */
static ferry_result_t set_scalar(const char *key, const struct kv_value *tmp)
{
    bool created;
    struct kv_value *v;

    if (key == NULL || !kv_key_valid(key, strlen(key)))
        return FERRY_EINVAL;
    v = kv_slot(&rt.st.vars, key, true, &created);
    if (v == NULL)
        return FERRY_ENOMEM;
    *v = *tmp;
    return FERRY_OK;
}

/* Stores a value owning (p) (already allocated); frees (p) on failure. */
static ferry_result_t set_owned(const char *key, enum kv_type t, void *p, size_t n)
{
    struct kv_value tmp;

    memset(&tmp, 0, sizeof(tmp));
    tmp.type = t;
    tmp.u.arr.p = p;
    tmp.u.arr.n = n;
    ferry_result_t r = set_scalar(key, &tmp);

    if (r != FERRY_OK)
        free(p);
    return r;
}

/* A heap copy of (n) bytes; never NULL-for-empty. */
static void *copy_of(const void *src, size_t n)
{
    void *p = malloc(n ? n : 1);

    if (p != NULL && n)
        memcpy(p, src, n);
    return p;
}

const char *ferry_key(char out[FERRY_KEY_MAX + 1], const char *prefix,
                      const char *name)
{
    size_t p = strlen(prefix), n = strlen(name);

    if (p > FERRY_KEY_MAX)
        p = FERRY_KEY_MAX;
    if (n > FERRY_KEY_MAX - p)
        n = FERRY_KEY_MAX - p;
    memcpy(out, prefix, p);
    memcpy(out + p, name, n);
    out[p + n] = '\0';
    return out;
}

int64_t ferry_get_i64(const char *key, int64_t dflt)
{
    const struct kv_value *v = find_typed(key, KV_INT64);
    return v ? v->u.i : dflt;
}

ferry_result_t ferry_set_i64(const char *key, int64_t value)
{
    struct kv_value tmp = {.type = KV_INT64, .u.i = value};
    return set_scalar(key, &tmp);
}

double ferry_get_f64(const char *key, double dflt)
{
    const struct kv_value *v = find_typed(key, KV_FLOAT64);
    return v ? v->u.f : dflt;
}

ferry_result_t ferry_set_f64(const char *key, double value)
{
    struct kv_value tmp = {.type = KV_FLOAT64, .u.f = value};
    return set_scalar(key, &tmp);
}

bool ferry_get_bool(const char *key, bool dflt)
{
    const struct kv_value *v = find_typed(key, KV_BOOL);
    return v ? v->u.b : dflt;
}

ferry_result_t ferry_set_bool(const char *key, bool value)
{
    struct kv_value tmp = {.type = KV_BOOL, .u.b = value};
    return set_scalar(key, &tmp);
}

const char *ferry_get_str(const char *key, const char *dflt)
{
    const struct kv_value *v = find_typed(key, KV_STRING);
    return v ? v->u.arr.p : dflt;
}

ferry_result_t ferry_set_str(const char *key, const char *value)
{
    size_t n;
    char *p;

    if (value == NULL)
        return FERRY_EINVAL;
    n = strlen(value);
    if (!utf8_valid(value, n))
        return FERRY_EINVAL;
    p = copy_of(value, n + 1);
    if (p == NULL)
        return FERRY_ENOMEM;
    return set_owned(key, KV_STRING, p, n);
}

static const void *get_array(const char *key, enum kv_type t, size_t *len)
{
    const struct kv_value *v = find_typed(key, t);

    if (len)
        *len = v ? v->u.arr.n : 0;
    return v ? v->u.arr.p : NULL;
}

static ferry_result_t set_array(const char *key, enum kv_type t,
                                const void *data, size_t n, size_t elem)
{
    void *p;

    if (n > KV_MAX_ELEMS || (n && data == NULL))
        return FERRY_EINVAL;
    p = copy_of(data, n * elem);
    if (p == NULL)
        return FERRY_ENOMEM;
    return set_owned(key, t, p, n);
}

const uint8_t *ferry_get_bytes(const char *key, size_t *len)
{
    return get_array(key, KV_BYTES, len);
}

ferry_result_t ferry_set_bytes(const char *key, const void *data, size_t len)
{
    return set_array(key, KV_BYTES, data, len, 1);
}

const int64_t *ferry_get_i64_list(const char *key, size_t *len)
{
    return get_array(key, KV_INT64_LIST, len);
}

ferry_result_t ferry_set_i64_list(const char *key, const int64_t *values, size_t len)
{
    return set_array(key, KV_INT64_LIST, values, len, sizeof(*values));
}

const double *ferry_get_f64_list(const char *key, size_t *len)
{
    return get_array(key, KV_FLOAT64_LIST, len);
}

ferry_result_t ferry_set_f64_list(const char *key, const double *values, size_t len)
{
    return set_array(key, KV_FLOAT64_LIST, values, len, sizeof(*values));
}

/* Resizes (or creates) a list of 8-byte elements in place. */
static void *list_mut(const char *key, enum kv_type t, size_t len)
{
    struct kv_value *v;
    bool created;
    void *p;

    if (key == NULL || len > KV_MAX_ELEMS || !kv_key_valid(key, strlen(key)))
        return NULL;
    v = kv_find(&rt.st.vars, key);
    if (v != NULL && v->type == t) {
        if (v->u.arr.n == len)
            return v->u.arr.p;
        p = realloc(v->u.arr.p, len ? len * 8 : 1);
        if (p == NULL)
            return NULL;
        if (len > v->u.arr.n)
            memset((char *)p + v->u.arr.n * 8, 0, (len - v->u.arr.n) * 8);
        v->u.arr.p = p;
        v->u.arr.n = len;
        return p;
    }
    p = calloc(len ? len : 1, 8);
    if (p == NULL)
        return NULL;
    v = kv_slot(&rt.st.vars, key, true, &created);
    if (v == NULL) {
        free(p);
        return NULL;
    }
    v->type = t;
    v->u.arr.p = p;
    v->u.arr.n = len;
    return p;
}

int64_t *ferry_i64_list_mut(const char *key, size_t len)
{
    return list_mut(key, KV_INT64_LIST, len);
}

double *ferry_f64_list_mut(const char *key, size_t len)
{
    return list_mut(key, KV_FLOAT64_LIST, len);
}

const char *ferry_next_key(const char *prefix, const char *after)
{
    const struct kv *m = &rt.st.vars;
    size_t plen, i;

    if (prefix == NULL)
        prefix = "";
    plen = strlen(prefix);
    i = kv_seek(m, prefix, plen);
    if (after != NULL && *after != '\0') {
        size_t alen = strlen(after), j = kv_seek(m, after, alen);
        if (j < m->n && m->e[j].key_len == alen && memcmp(m->e[j].key, after, alen) == 0)
            j++;   /* strictly after */
        if (j > i)
            i = j;
    }
    if (i < m->n && m->e[i].key_len >= plen && memcmp(m->e[i].key, prefix, plen) == 0)
        return m->e[i].key;
    return NULL;
}

bool ferry_exists(const char *key)
{
    return kv_find(&rt.st.vars, key) != NULL;
}

ferry_result_t ferry_del(const char *key)
{
    if (key == NULL || !kv_key_valid(key, strlen(key)))
        return FERRY_EINVAL;
    kv_delete(&rt.st.vars, key);
    return FERRY_OK;
}
