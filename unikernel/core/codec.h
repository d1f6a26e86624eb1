/*
 * codec.h: byte-level encodings the core needs without a C library:
 * UTF-8 validation, hex and base64. All functions are total: they check
 * their input and never read or write out of bounds.
 */
#ifndef FERRY_CODEC_H
#define FERRY_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True if (s, n) is well-formed UTF-8 (no overlongs, no surrogates). */
bool utf8_valid(const char *s, size_t n);

/* The value of one hex digit (either case), or -1 if (c) is not one. */
int hex_digit_value(char c);

/* Writes the 16 lower-case hex digits of (v) to (out); no NUL. */
void hex64_encode(uint64_t v, char out[16]);

/* Parses exactly 16 hex digits (either case). False on any other input. */
bool hex64_decode(const char *s, size_t n, uint64_t *v);

/* Number of base64 characters (with padding) for (n) bytes; 0 if it would
 * overflow size_t. */
size_t base64_encoded_len(size_t n);

/* Writes base64 (standard alphabet, '=' padding) of (src, n) to (out),
 * which holds base64_encoded_len(n) bytes; no NUL. */
void base64_encode(const uint8_t *src, size_t n, char *out);

/*
 * Decodes strict base64 (standard alphabet, length a multiple of 4, padding
 * only at the end, zero unused bits) from (s, n) into (out), which holds at
 * least n / 4 * 3 bytes. Sets (*out_len). False on any malformed input.
 */
bool base64_decode(const char *s, size_t n, uint8_t *out, size_t *out_len);

/*
 * 64-bit values as 8 little-endian bytes (checkpoint lists are base64 of
 * these bytes, whatever the host's byte order). Plain shifts: compilers
 * turn them into a single load/store on little-endian targets.
 */
static inline void le64_store(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint64_t le64_load(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#endif /* FERRY_CODEC_H */
