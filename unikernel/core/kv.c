/* kv.c: see kv.h. */
#include "kv.h"

#include <stdlib.h>
#include <string.h>

#include "../include/ferry.h"
#include "codec.h"

bool kv_key_valid(const char *key, size_t n)
{
    return key != NULL && n >= 1 && n <= FERRY_KEY_MAX && utf8_valid(key, n);
}

void kv_init(struct kv *m)
{
    m->e = NULL;
    m->n = m->cap = 0;
}

void kv_value_release(struct kv_value *v)
{
    switch (v->type) {
    case KV_STRING:
    case KV_BYTES:
    case KV_INT64_LIST:
    case KV_FLOAT64_LIST:
        free(v->u.arr.p);
        v->u.arr.p = NULL;
        v->u.arr.n = 0;
        break;
    default:
        break;
    }
    v->type = 0;
}

void kv_clear(struct kv *m)
{
    for (size_t i = 0; i < m->n; i++) {
        free(m->e[i].key);
        kv_value_release(&m->e[i].v);
    }
    free(m->e);
    kv_init(m);
}

/* Byte-wise order, shorter first on a common prefix. */
static int key_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);

    if (c != 0)
        return c;
    return an < bn ? -1 : an > bn;
}

/* Index of (key) if found (*found = true), else its insertion point. */
static size_t search(const struct kv *m, const char *key, size_t n, bool *found)
{
    size_t lo = 0, hi = m->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = key_cmp(m->e[mid].key, m->e[mid].key_len, key, n);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = false;
    return lo;
}

struct kv_value *kv_find(const struct kv *m, const char *key)
{
    bool found;
    size_t i, n;

    if (key == NULL)
        return NULL;
    n = strlen(key);
    i = search(m, key, n, &found);
    return found ? &m->e[i].v : NULL;
}

size_t kv_seek(const struct kv *m, const char *key, size_t n)
{
    bool found;

    return search(m, key, n, &found);
}

struct kv_value *kv_slot(struct kv *m, const char *key, bool reset,
                         bool *created)
{
    bool found;
    size_t i, n;
    char *copy;

    *created = false;
    if (key == NULL)
        return NULL;
    n = strlen(key);
    if (!kv_key_valid(key, n))
        return NULL;
    i = search(m, key, n, &found);
    if (found) {
        if (reset)
            kv_value_release(&m->e[i].v);
        return &m->e[i].v;
    }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 16;
        struct kv_entry *e;

        if (cap > (size_t)-1 / sizeof(*e))
            return NULL;
        e = realloc(m->e, cap * sizeof(*e));
        if (e == NULL)
            return NULL;
        m->e = e;
        m->cap = cap;
    }
    copy = malloc(n + 1);
    if (copy == NULL)
        return NULL;
    memcpy(copy, key, n + 1);
    memmove(&m->e[i + 1], &m->e[i], (m->n - i) * sizeof(*m->e));
    m->e[i].key = copy;
    m->e[i].key_len = n;
    memset(&m->e[i].v, 0, sizeof(m->e[i].v));
    m->n++;
    *created = true;
    return &m->e[i].v;
}

void kv_delete(struct kv *m, const char *key)
{
    bool found;
    size_t i;

    if (key == NULL)
        return;
    i = search(m, key, strlen(key), &found);
    if (!found)
        return;
    free(m->e[i].key);
    kv_value_release(&m->e[i].v);
    memmove(&m->e[i], &m->e[i + 1], (m->n - i - 1) * sizeof(*m->e));
    m->n--;
}
