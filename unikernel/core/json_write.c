/* json_write.c: see json_write.h. */
#include "json_write.h"

#include <stdlib.h>
#include <string.h>

#include "codec.h"

void jw_init(struct jw *w, size_t reserve)
{
    memset(w, 0, sizeof(*w));
    w->cap = reserve + 256;
    w->buf = malloc(w->cap);
    if (w->buf == NULL) {
        w->failed = true;
        w->cap = 0;
        return;
    }
    w->len = reserve;
}

void jw_free(struct jw *w)
{
    free(w->buf);
    w->buf = NULL;
    w->len = w->cap = 0;
}

static bool reserve_more(struct jw *w, size_t n)
{
    size_t cap;
    char *p;

    if (w->failed)
        return false;
    if (w->cap - w->len >= n)
        return true;
    if (n > (size_t)-1 / 2 - w->len) {
        w->failed = true;
        return false;
    }
    cap = w->cap * 2;
    if (cap < w->len + n)
        cap = w->len + n;
    p = realloc(w->buf, cap);
    if (p == NULL) {
        w->failed = true;
        return false;
    }
    w->buf = p;
    w->cap = cap;
    return true;
}

static void put(struct jw *w, const char *s, size_t n)
{
    if (!reserve_more(w, n))
        return;
    memcpy(w->buf + w->len, s, n);
    w->len += n;
}

static void put_char(struct jw *w, char c)
{
    put(w, &c, 1);
}

/* Comma handling before any value. */
static void before_value(struct jw *w)
{
    if (w->after_key) {
        w->after_key = false;
        return;
    }
    if (w->depth > 0) {
        if (w->has_items[w->depth - 1])
            put_char(w, ',');
        w->has_items[w->depth - 1] = true;
    }
}

static void open_container(struct jw *w, char c)
{
    before_value(w);
    if (w->depth >= JW_MAX_DEPTH) {
        w->failed = true;
        return;
    }
    w->has_items[w->depth++] = false;
    put_char(w, c);
}

static void close_container(struct jw *w, char c)
{
    if (w->depth == 0 || w->after_key) {
        w->failed = true;
        return;
    }
    w->depth--;
    put_char(w, c);
}

void jw_obj_begin(struct jw *w) { open_container(w, '{'); }
void jw_obj_end(struct jw *w) { close_container(w, '}'); }
void jw_arr_begin(struct jw *w) { open_container(w, '['); }
void jw_arr_end(struct jw *w) { close_container(w, ']'); }

static void put_escaped(struct jw *w, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t start = 0;

    put_char(w, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[6];
        size_t elen = 2;

        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        put(w, s + start, i - start);
        start = i + 1;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
            esc[4] = hex[c >> 4]; esc[5] = hex[c & 0xf];
            elen = 6;
        }
        put(w, esc, elen);
    }
    put(w, s + start, n - start);
    put_char(w, '"');
}

void jw_key_n(struct jw *w, const char *key, size_t n)
{
    if (w->depth == 0 || w->after_key) {
        w->failed = true;
        return;
    }
    if (w->has_items[w->depth - 1])
        put_char(w, ',');
    w->has_items[w->depth - 1] = true;
    put_escaped(w, key, n);
    put_char(w, ':');
    w->after_key = true;
}

void jw_key(struct jw *w, const char *key) { jw_key_n(w, key, strlen(key)); }

void jw_str_n(struct jw *w, const char *s, size_t n)
{
    before_value(w);
    put_escaped(w, s, n);
}

void jw_str(struct jw *w, const char *s) { jw_str_n(w, s, strlen(s)); }

size_t fmt_i64(int64_t v, char *out)
{
    char tmp[20];
    size_t n = 0, len = 0;
    /* Work in uint64_t so INT64_MIN negates without overflow. */
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;

    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        out[len++] = '-';
    while (n > 0)
        out[len++] = tmp[--n];
    return len;
}

void jw_i64(struct jw *w, int64_t v)
{
    char tmp[21];

    before_value(w);
    put(w, tmp, fmt_i64(v, tmp));
}

void jw_bool(struct jw *w, bool v)
{
    before_value(w);
    if (v)
        put(w, "true", 4);
    else
        put(w, "false", 5);
}

void jw_null(struct jw *w)
{
    before_value(w);
    put(w, "null", 4);
}

/* 10^k for 0 <= k <= 22, all exact in binary64. */
static double pow10_small(int k)
{
    double r = 1.0;

    while (k-- > 0)
        r *= 10.0;
    return r;
}

/* 10^k for any k, by exact steps of up to 10^22. Deterministic; accurate
 * to a few ulps, enough for 15 significant digits. */
static double pow10_any(int k)
{
    double r = 1.0;
    bool neg = k < 0;

    if (neg)
        k = -k;
    while (k > 22) {
        r *= 1e22;
        k -= 22;
    }
    r *= pow10_small(k);
    return neg ? 1.0 / r : r;
}

#define SIG_DIGITS 15

void jw_f64(struct jw *w, double v)
{
    char digits[SIG_DIGITS];
    char out[40];
    size_t n = 0;
    int e = 0, ndig;
    uint64_t m;
    double scaled;

    if (v != v || v > 1.7976931348623157e308 || v < -1.7976931348623157e308) {
        jw_null(w);
        return;
    }
    if (v == 0.0) {
        jw_raw_value(w, "0", 1);
        return;
    }
    if (v < 0) {
        out[n++] = '-';
        v = -v;
    }
    /* Decimal exponent e with 10^e <= v < 10^(e+1), approximately. */
    while (v >= pow10_any(e + 1) && e < 400)
        e++;
    while (v < pow10_any(e) && e > -400)
        e--;
    /* Scale to a 15-digit integer. Split the scaling so each factor is
     * finite even for subnormals and values near DBL_MAX. */
    {
        int k = SIG_DIGITS - 1 - e;
        if (k > 300)
            scaled = v * pow10_any(300) * pow10_any(k - 300);
        else
            scaled = v * pow10_any(k);
    }
    m = (uint64_t)(scaled + 0.5);
    if (m >= 1000000000000000ULL) {
        m = (m + 5) / 10;
        e++;
    }
    if (m < 100000000000000ULL)
        m = 100000000000000ULL;
    for (int i = SIG_DIGITS - 1; i >= 0; i--) {
        digits[i] = (char)('0' + m % 10);
        m /= 10;
    }
    ndig = SIG_DIGITS;
    while (ndig > 1 && digits[ndig - 1] == '0')
        ndig--;
    if (e >= 0 && e < SIG_DIGITS) {
        /* Plain: ddd.ddd */
        for (int i = 0; i <= e; i++)
            out[n++] = i < ndig ? digits[i] : '0';
        if (ndig > e + 1) {
            out[n++] = '.';
            for (int i = e + 1; i < ndig; i++)
                out[n++] = digits[i];
        }
    } else if (e < 0 && e >= -5) {
        out[n++] = '0';
        out[n++] = '.';
        for (int i = -1; i > e; i--)
            out[n++] = '0';
        for (int i = 0; i < ndig; i++)
            out[n++] = digits[i];
    } else {
        out[n++] = digits[0];
        if (ndig > 1) {
            out[n++] = '.';
            for (int i = 1; i < ndig; i++)
                out[n++] = digits[i];
        }
        out[n++] = 'e';
        n += fmt_i64(e, out + n);
    }
    jw_raw_value(w, out, n);
}

void jw_f64_bits(struct jw *w, double v)
{
    uint64_t bits;
    char hex[16];

    memcpy(&bits, &v, sizeof(bits));
    hex64_encode(bits, hex);
    jw_str_n(w, hex, sizeof(hex));
}

void jw_base64(struct jw *w, const uint8_t *data, size_t n)
{
    size_t elen = base64_encoded_len(n);

    before_value(w);
    if (elen == 0 && n != 0) {
        w->failed = true;
        return;
    }
    if (!reserve_more(w, elen + 2))
        return;
    w->buf[w->len++] = '"';
    base64_encode(data, n, w->buf + w->len);
    w->len += elen;
    w->buf[w->len++] = '"';
}

void jw_base64_le64(struct jw *w, const void *vals, size_t n)
{
    /* Converted to little-endian bytes a chunk at a time. A chunk is a
     * multiple of 3 values (24 bytes, 32 base64 characters, no padding),
     * so the chunks' encodings concatenate to the encoding of the whole. */
    enum { CHUNK = 3 * 32 };
    uint8_t tmp[CHUNK * 8];
    const unsigned char *src = vals;
    size_t elen;

    before_value(w);
    if (n > (size_t)-1 / 8 || ((elen = base64_encoded_len(n * 8)) == 0 && n != 0)) {
        w->failed = true;
        return;
    }
    if (!reserve_more(w, elen + 2))
        return;
    w->buf[w->len++] = '"';
    for (size_t i = 0; i < n;) {
        size_t k = n - i < CHUNK ? n - i : CHUNK;

        for (size_t e = 0; e < k; e++) {
            uint64_t v;
            memcpy(&v, src + (i + e) * 8, 8);
            le64_store(tmp + e * 8, v);
        }
        base64_encode(tmp, k * 8, w->buf + w->len);
        w->len += base64_encoded_len(k * 8);
        i += k;
    }
    w->buf[w->len++] = '"';
}

void jw_raw_value(struct jw *w, const char *s, size_t n)
{
    before_value(w);
    put(w, s, n);
}
