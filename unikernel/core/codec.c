/* codec.c: see codec.h. */
#include "codec.h"

bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    while (i < n) {
        unsigned c = p[i];
        size_t extra;
        uint32_t cp, min;

        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            extra = 1; cp = c & 0x1f; min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            extra = 2; cp = c & 0x0f; min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            extra = 3; cp = c & 0x07; min = 0x10000;
        } else {
            return false;
        }
        if (n - i <= extra)
            return false;
        for (size_t k = 1; k <= extra; k++) {
            if ((p[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += extra + 1;
    }
    return true;
}

static const char hex_digits[] = "0123456789abcdef";

void hex64_encode(uint64_t v, char out[16])
{
    for (int i = 15; i >= 0; i--) {
        out[i] = hex_digits[v & 0xf];
        v >>= 4;
    }
}

int hex_digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool hex64_decode(const char *s, size_t n, uint64_t *v)
{
    uint64_t r = 0;

    if (n != 16)
        return false;
    for (size_t i = 0; i < 16; i++) {
        int d = hex_digit_value(s[i]);
        if (d < 0)
            return false;
        r = (r << 4) | (uint64_t)d;
    }
    *v = r;
    return true;
}

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t base64_encoded_len(size_t n)
{
    size_t groups = n / 3 + (n % 3 != 0);

    if (groups > (size_t)-1 / 4)
        return 0;
    return groups * 4;
}

void base64_encode(const uint8_t *src, size_t n, char *out)
{
    size_t i = 0, o = 0;

    for (; n - i >= 3; i += 3) {
        uint32_t v = (uint32_t)src[i] << 16 | (uint32_t)src[i + 1] << 8 | src[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = b64_alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)src[i] << 16;
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)src[i] << 16 | (uint32_t)src[i + 1] << 8;
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = '=';
    }
}

/* The value of each byte in the base64 alphabet, BAD for any other byte. */
#define BAD 0xff
static const uint8_t b64_values[256] = {
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,  62, BAD, BAD, BAD,  63,
     52,  53,  54,  55,  56,  57,  58,  59,  60,  61, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD,   0,   1,   2,   3,   4,   5,   6,   7,   8,   9,  10,  11,  12,  13,  14,
     15,  16,  17,  18,  19,  20,  21,  22,  23,  24,  25, BAD, BAD, BAD, BAD, BAD,
    BAD,  26,  27,  28,  29,  30,  31,  32,  33,  34,  35,  36,  37,  38,  39,  40,
     41,  42,  43,  44,  45,  46,  47,  48,  49,  50,  51, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
};
#undef BAD

bool base64_decode(const char *s, size_t n, uint8_t *out, size_t *out_len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t o = 0, i;
    int pad = 0;
    uint32_t v = 0;

    if (n % 4 != 0)
        return false;
    if (n == 0) {
        *out_len = 0;
        return true;
    }
    /* Every group but the last: four alphabet characters, no padding. */
    for (i = 0; i < n - 4; i += 4) {
        uint32_t a = b64_values[p[i]], b = b64_values[p[i + 1]],
                 c = b64_values[p[i + 2]], d = b64_values[p[i + 3]];

        if ((a | b | c | d) & 0x80)
            return false;
        v = a << 18 | b << 12 | c << 6 | d;
        out[o++] = (uint8_t)(v >> 16);
        out[o++] = (uint8_t)(v >> 8);
        out[o++] = (uint8_t)v;
    }
    /* The last group may end in "=" or "==". */
    if (p[i + 3] == '=')
        pad = (p[i + 2] == '=') ? 2 : 1;
    v = 0;
    for (int k = 0; k < 4; k++) {
        uint32_t d = k < 4 - pad ? b64_values[p[i + k]] : 0;
        if (d & 0x80)
            return false;
        v = (v << 6) | d;
    }
    /* Unused low bits must be zero: one encoding per byte string. */
    if ((pad == 1 && (v & 0xff)) || (pad == 2 && (v & 0xffff)))
        return false;
    out[o++] = (uint8_t)(v >> 16);
    if (pad < 2)
        out[o++] = (uint8_t)(v >> 8);
    if (pad < 1)
        out[o++] = (uint8_t)v;
    *out_len = o;
    return true;
}
