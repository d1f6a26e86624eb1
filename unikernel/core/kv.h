/*
 * kv.h: a typed key/value map, kept sorted by key.
 *
 * One instance holds the app's store, one its parameters. Sorted order
 * makes lookups O(log n) and checkpoints byte-for-byte reproducible.
 */
#ifndef FERRY_KV_H
#define FERRY_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kv_type {
    KV_INT64 = 1,
    KV_FLOAT64,
    KV_BOOL,
    KV_STRING,
    KV_BYTES,
    KV_INT64_LIST,
    KV_FLOAT64_LIST
};

struct kv_value {
    enum kv_type type;
    union {
        int64_t i;
        double f;
        bool b;
        /* STRING (NUL-terminated, n excludes it), BYTES, *_LIST (n elements). */
        struct {
            void *p;
            size_t n;
        } arr;
    } u;
};

struct kv_entry {
    char *key;
    size_t key_len;
    struct kv_value v;
};

struct kv {
    struct kv_entry *e;
    size_t n;
    size_t cap;
};

/* Largest number of list elements or bytes one value may hold. */
#define KV_MAX_ELEMS ((size_t)1 << 28)

/* A valid key: 1..FERRY_KEY_MAX bytes of UTF-8. */
bool kv_key_valid(const char *key, size_t n);

void kv_init(struct kv *m);
void kv_clear(struct kv *m);

/* The value at (key), or NULL. */
struct kv_value *kv_find(const struct kv *m, const char *key);

/*
 * Returns the value slot for (key), creating it (type 0, caller fills it)
 * if absent; an existing value's heap data is freed and its type reset to
 * 0 only when (reset) is true. NULL on an invalid key or out of memory.
 * (*created) tells whether the key is new.
 */
struct kv_value *kv_slot(struct kv *m, const char *key, bool reset,
                         bool *created);

/* Index of the first entry whose key is not below (key, n), byte-wise
 * (m->n if none): the entries from there on sort at or after it. */
size_t kv_seek(const struct kv *m, const char *key, size_t n);

/* Removes (key) if present. */
void kv_delete(struct kv *m, const char *key);

/* Frees the heap data a value owns (strings, bytes, lists). */
void kv_value_release(struct kv_value *v);

#endif /* FERRY_KV_H */
