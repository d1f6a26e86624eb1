/*
 * json_parse.h: a strict pull parser for JSON text (RFC 8259).
 *
 * The caller walks the document with the functions below, in the order it
 * expects the values, so no tree is built: a multi-megabyte checkpoint is
 * read straight into the store. Every function checks its input and bounds;
 * the first error sticks in `err` (later calls fail at once), so callers
 * may check once. Nesting is limited to JP_MAX_DEPTH.
 */
#ifndef FERRY_JSON_PARSE_H
#define FERRY_JSON_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JP_MAX_DEPTH 32

enum jp_kind {
    JP_END = 0,      /* no value here (error or end of text) */
    JP_OBJECT,
    JP_ARRAY,
    JP_STRING,
    JP_NUMBER,
    JP_BOOL,
    JP_NULL
};

struct jp {
    const char *p;
    const char *end;
    int depth;
    const char *err;     /* NULL while all is well */
};

/* A decoded string: malloc'd, NUL-terminated, no embedded NUL, UTF-8. */
struct jstr {
    char *s;
    size_t n;
};

void jp_init(struct jp *j, const char *text, size_t n);

/* Records (msg) as the error unless one is set; returns false. */
bool jp_fail(struct jp *j, const char *msg);

/* Kind of the next value (skipping white space); JP_END on error. */
enum jp_kind jp_peek(struct jp *j);

/* Consumes '{' / '['. */
bool jp_obj_begin(struct jp *j);
bool jp_arr_begin(struct jp *j);

/*
 * Advances to the next object member: returns 1 with its name decoded into
 * (*key) (caller frees key->s) and the colon consumed, 0 after consuming
 * the closing '}', -1 on error.
 */
int jp_obj_next(struct jp *j, struct jstr *key);

/* Advances to the next array element: 1 if one follows, 0 after consuming
 * the closing ']', -1 on error. */
int jp_arr_next(struct jp *j);

/* Decodes a string value into (*out) (caller frees out->s). */
bool jp_string(struct jp *j, struct jstr *out);

/* Returns a pointer to the raw bytes of a string value that has no escapes
 * (e.g. hex digits), without allocating. Fails on an escaped string. */
bool jp_string_raw(struct jp *j, const char **s, size_t *n);

/* An integer value (no fraction, no exponent) that fits int64. */
bool jp_int64(struct jp *j, int64_t *v);

/*
 * Any number. (*is_int) tells whether it was written as an integer that
 * fits int64 (then *iv holds it exactly); (*dv) always holds the nearest
 * double (correctly rounded for up to 15 digits and |exponent| <= 22,
 * otherwise within a few ulps; deterministic everywhere).
 */
bool jp_number(struct jp *j, bool *is_int, int64_t *iv, double *dv);

bool jp_bool(struct jp *j, bool *v);
bool jp_null(struct jp *j);

/* Skips one value of any kind (depth-limited). */
bool jp_skip(struct jp *j);

/* Succeeds only if nothing but white space remains. */
bool jp_finish(struct jp *j);

#endif /* FERRY_JSON_PARSE_H */
