/*
 * json_write.h: builds JSON text in a growable buffer.
 *
 * The writer places commas itself: call jw_key() before each member value
 * and the value functions inside arrays. An allocation failure or misuse
 * sets `failed`; later calls do nothing, so callers check once at the end.
 */
#ifndef FERRY_JSON_WRITE_H
#define FERRY_JSON_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JW_MAX_DEPTH 32

struct jw {
    char *buf;
    size_t len;
    size_t cap;
    bool failed;
    int depth;
    /* Per open container: true once it holds an element. */
    bool has_items[JW_MAX_DEPTH];
    bool after_key;
};

/* Starts an empty writer that reserves (reserve) bytes of headroom at the
 * front of its buffer (e.g. for a frame header). */
void jw_init(struct jw *w, size_t reserve);
void jw_free(struct jw *w);

void jw_obj_begin(struct jw *w);
void jw_obj_end(struct jw *w);
void jw_arr_begin(struct jw *w);
void jw_arr_end(struct jw *w);

/* Writes the member name (key, n bytes, UTF-8) and the colon. */
void jw_key_n(struct jw *w, const char *key, size_t n);
void jw_key(struct jw *w, const char *key);

/* A JSON string from (s, n); bytes are escaped as needed, invalid UTF-8
 * must have been rejected by the caller. */
void jw_str_n(struct jw *w, const char *s, size_t n);
void jw_str(struct jw *w, const char *s);
void jw_i64(struct jw *w, int64_t v);
void jw_bool(struct jw *w, bool v);
void jw_null(struct jw *w);
/* A display decimal with 15 significant digits; null for NaN/infinity. */
void jw_f64(struct jw *w, double v);
/* A string of the 16 hex digits of the IEEE-754 bits of (v). */
void jw_f64_bits(struct jw *w, double v);
/* A string holding the base64 of (data, n). */
void jw_base64(struct jw *w, const uint8_t *data, size_t n);
/* A string holding the base64 of the (n) 64-bit values at (vals) (int64_t
 * or double), each as 8 little-endian bytes: 8n bytes, no separators. */
void jw_base64_le64(struct jw *w, const void *vals, size_t n);

/* Appends raw bytes (trusted JSON text) as one value. */
void jw_raw_value(struct jw *w, const char *s, size_t n);

/* Formats (v) in decimal into (out), which holds >= 21 bytes; returns the
 * length (no NUL). */
size_t fmt_i64(int64_t v, char *out);

#endif /* FERRY_JSON_WRITE_H */
