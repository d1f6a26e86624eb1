/* json_parse.c: see json_parse.h. */
#include "json_parse.h"

#include <stdlib.h>
#include <string.h>

#include "codec.h"

void jp_init(struct jp *j, const char *text, size_t n)
{
    j->p = text;
    j->end = text + n;
    j->depth = 0;
    j->err = NULL;
}

bool jp_fail(struct jp *j, const char *msg)
{
    if (j->err == NULL)
        j->err = msg;
    return false;
}

static void skip_ws(struct jp *j)
{
    while (j->p < j->end &&
           (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

enum jp_kind jp_peek(struct jp *j)
{
    if (j->err)
        return JP_END;
    skip_ws(j);
    if (j->p >= j->end)
        return JP_END;
    switch (*j->p) {
    case '{': return JP_OBJECT;
    case '[': return JP_ARRAY;
    case '"': return JP_STRING;
    case 't': case 'f': return JP_BOOL;
    case 'n': return JP_NULL;
    default:
        if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))
            return JP_NUMBER;
        return JP_END;
    }
}

static bool expect_char(struct jp *j, char c, const char *msg)
{
    if (j->err)
        return false;
    skip_ws(j);
    if (j->p >= j->end || *j->p != c)
        return jp_fail(j, msg);
    j->p++;
    return true;
}

static bool open_level(struct jp *j, char c, const char *msg)
{
    if (!expect_char(j, c, msg))
        return false;
    if (j->depth >= JP_MAX_DEPTH)
        return jp_fail(j, "nesting too deep");
    j->depth++;
    return true;
}

bool jp_obj_begin(struct jp *j) { return open_level(j, '{', "expected an object"); }
bool jp_arr_begin(struct jp *j) { return open_level(j, '[', "expected an array"); }

/*
 * After '{' or '[' the next token is either the closer or an element; after
 * an element it is ',' or the closer. We tell the two apart by looking back
 * at the last non-space byte consumed.
 */
static int next_in(struct jp *j, char opener, char closer)
{
    const char *q;

    if (j->err)
        return -1;
    skip_ws(j);
    if (j->p >= j->end)
        return jp_fail(j, "truncated document"), -1;
    q = j->p - 1;
    while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
        q--;
    if (*j->p == closer) {
        if (*q == ',')
            return jp_fail(j, "trailing comma"), -1;
        j->p++;
        j->depth--;
        return 0;
    }
    if (*q != opener) {
        if (*j->p != ',')
            return jp_fail(j, "expected ',' or a closing bracket"), -1;
        j->p++;
    }
    return 1;
}

int jp_obj_next(struct jp *j, struct jstr *key)
{
    int r = next_in(j, '{', '}');

    key->s = NULL;
    key->n = 0;
    if (r != 1)
        return r;
    if (jp_peek(j) != JP_STRING)
        return jp_fail(j, "expected a member name"), -1;
    if (!jp_string(j, key))
        return -1;
    if (!expect_char(j, ':', "expected ':'")) {
        free(key->s);
        key->s = NULL;
        return -1;
    }
    return 1;
}

int jp_arr_next(struct jp *j)
{
    return next_in(j, '[', ']');
}

static bool read_u16_escape(struct jp *j, const char *s, uint32_t *v)
{
    uint32_t r = 0;

    if (j->end - s < 4)
        return jp_fail(j, "truncated \\u escape");
    for (int i = 0; i < 4; i++) {
        int d = hex_digit_value(s[i]);
        if (d < 0)
            return jp_fail(j, "bad \\u escape");
        r = (r << 4) | (uint32_t)d;
    }
    *v = r;
    return true;
}

static size_t put_utf8(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Finds the closing quote of the string starting at j->p + 1, checking for
 * control characters. Sets (*has_escape). */
static const char *string_end(struct jp *j, bool *has_escape)
{
    const char *q = j->p + 1;

    *has_escape = false;
    while (q < j->end) {
        unsigned char c = (unsigned char)*q;
        if (c == '"')
            return q;
        if (c < 0x20) {
            jp_fail(j, "control character in string");
            return NULL;
        }
        if (c == '\\') {
            *has_escape = true;
            if (j->end - q < 2)
                break;
            q++;
        }
        q++;
    }
    jp_fail(j, "truncated string");
    return NULL;
}

bool jp_string(struct jp *j, struct jstr *out)
{
    const char *q, *close;
    bool has_escape;
    char *buf;
    size_t n = 0;

    out->s = NULL;
    out->n = 0;
    if (jp_peek(j) != JP_STRING)
        return jp_fail(j, "expected a string");
    close = string_end(j, &has_escape);
    if (close == NULL)
        return false;
    /* Decoded text is never longer than the escaped text. */
    buf = malloc((size_t)(close - j->p));
    if (buf == NULL)
        return jp_fail(j, "out of memory");
    for (q = j->p + 1; q < close;) {
        uint32_t cp, lo;

        if (*q != '\\') {
            buf[n++] = *q++;
            continue;
        }
        q++;
        switch (*q) {
        case '"': buf[n++] = '"'; q++; continue;
        case '\\': buf[n++] = '\\'; q++; continue;
        case '/': buf[n++] = '/'; q++; continue;
        case 'b': buf[n++] = '\b'; q++; continue;
        case 'f': buf[n++] = '\f'; q++; continue;
        case 'n': buf[n++] = '\n'; q++; continue;
        case 'r': buf[n++] = '\r'; q++; continue;
        case 't': buf[n++] = '\t'; q++; continue;
        case 'u': break;
        default:
            free(buf);
            return jp_fail(j, "bad escape in string");
        }
        q++;
        if (!read_u16_escape(j, q, &cp) || q + 4 > close) {
            free(buf);
            return jp_fail(j, "bad \\u escape");
        }
        q += 4;
        if (cp >= 0xd800 && cp <= 0xdbff) {
            if (close - q < 6 || q[0] != '\\' || q[1] != 'u' ||
                !read_u16_escape(j, q + 2, &lo) || lo < 0xdc00 || lo > 0xdfff) {
                free(buf);
                return jp_fail(j, "unpaired surrogate in string");
            }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            q += 6;
        } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            free(buf);
            return jp_fail(j, "unpaired surrogate in string");
        }
        if (cp == 0) {
            free(buf);
            return jp_fail(j, "NUL character in string");
        }
        n += put_utf8(buf + n, cp);
    }
    if (!utf8_valid(buf, n)) {
        free(buf);
        return jp_fail(j, "string is not valid UTF-8");
    }
    buf[n] = '\0';   /* fits: n < close - j->p */
    out->s = buf;
    out->n = n;
    j->p = close + 1;
    return true;
}

bool jp_string_raw(struct jp *j, const char **s, size_t *n)
{
    const char *close;
    bool has_escape;

    if (jp_peek(j) != JP_STRING)
        return jp_fail(j, "expected a string");
    close = string_end(j, &has_escape);
    if (close == NULL)
        return false;
    if (has_escape)
        return jp_fail(j, "unexpected escape in string");
    *s = j->p + 1;
    *n = (size_t)(close - j->p - 1);
    j->p = close + 1;
    return true;
}

/* Scans a number token per RFC 8259, returning its pieces. */
struct num_scan {
    bool neg;
    const char *int_start, *int_end;     /* integer digits */
    const char *frac_start, *frac_end;   /* fraction digits (may be empty) */
    bool has_frac, has_exp;
    int64_t exp;                         /* clamped to +-100000 */
};

static bool scan_number(struct jp *j, struct num_scan *ns)
{
    const char *q;

    if (jp_peek(j) != JP_NUMBER)
        return jp_fail(j, "expected a number");
    memset(ns, 0, sizeof(*ns));
    q = j->p;
    if (*q == '-') {
        ns->neg = true;
        q++;
    }
    ns->int_start = q;
    if (q >= j->end || *q < '0' || *q > '9')
        return jp_fail(j, "bad number");
    if (*q == '0') {
        q++;
    } else {
        while (q < j->end && *q >= '0' && *q <= '9')
            q++;
    }
    ns->int_end = q;
    if (q < j->end && *q == '.') {
        q++;
        ns->has_frac = true;
        ns->frac_start = q;
        while (q < j->end && *q >= '0' && *q <= '9')
            q++;
        ns->frac_end = q;
        if (ns->frac_end == ns->frac_start)
            return jp_fail(j, "bad number");
    }
    if (q < j->end && (*q == 'e' || *q == 'E')) {
        bool eneg = false;
        const char *ds;

        q++;
        ns->has_exp = true;
        if (q < j->end && (*q == '+' || *q == '-'))
            eneg = (*q++ == '-');
        ds = q;
        while (q < j->end && *q >= '0' && *q <= '9') {
            if (ns->exp < 100000)
                ns->exp = ns->exp * 10 + (*q - '0');
            q++;
        }
        if (q == ds)
            return jp_fail(j, "bad number");
        if (eneg)
            ns->exp = -ns->exp;
    }
    /* A number must not run straight into a letter or digit. */
    if (q < j->end && ((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') ||
                       (*q >= '0' && *q <= '9') || *q == '.' || *q == '+' ||
                       *q == '-'))
        return jp_fail(j, "bad number");
    j->p = q;
    return true;
}

/* Integer value of the integer digits, if it fits int64. */
static bool scan_to_int64(const struct num_scan *ns, int64_t *v)
{
    uint64_t u = 0;
    uint64_t limit = ns->neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;

    for (const char *q = ns->int_start; q < ns->int_end; q++) {
        uint64_t d = (uint64_t)(*q - '0');
        if (u > (limit - d) / 10)
            return false;
        u = u * 10 + d;
    }
    if (ns->neg)
        *v = u == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)u;
    else
        *v = (int64_t)u;
    return true;
}

static double pow10_exact(int k)
{
    double r = 1.0;

    while (k-- > 0)
        r *= 10.0;
    return r;
}

static double scan_to_double(const struct num_scan *ns)
{
    uint64_t m = 0;
    int64_t e = ns->exp;
    int digits = 0;
    double d;

    /* Up to 19 significant digits go into the mantissa; the rest only
     * shift the exponent. */
    for (const char *q = ns->int_start; q < ns->int_end; q++) {
        if (digits < 19) {
            m = m * 10 + (uint64_t)(*q - '0');
            if (m != 0)
                digits++;
        } else {
            e++;
        }
    }
    if (ns->has_frac) {
        for (const char *q = ns->frac_start; q < ns->frac_end; q++) {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*q - '0');
                if (m != 0)
                    digits++;
                e--;
            }
        }
    }
    if (e < -400 || m == 0) {
        d = 0.0;
    } else if (e > 400) {
        d = 1e308 * 10.0;   /* infinity */
    } else {
        d = (double)m;
        /* Exact when m < 2^53 and |e| <= 22 (one rounding only). */
        while (e > 22) {
            d *= 1e22;
            e -= 22;
        }
        while (e < -22) {
            d /= 1e22;
            e += 22;
        }
        if (e >= 0)
            d *= pow10_exact((int)e);
        else
            d /= pow10_exact((int)-e);
    }
    return ns->neg ? -d : d;
}

bool jp_int64(struct jp *j, int64_t *v)
{
    struct num_scan ns;

    if (!scan_number(j, &ns))
        return false;
    if (ns.has_frac || ns.has_exp)
        return jp_fail(j, "expected an integer");
    if (!scan_to_int64(&ns, v))
        return jp_fail(j, "integer out of range");
    return true;
}

bool jp_number(struct jp *j, bool *is_int, int64_t *iv, double *dv)
{
    struct num_scan ns;

    if (!scan_number(j, &ns))
        return false;
    *is_int = !ns.has_frac && !ns.has_exp && scan_to_int64(&ns, iv);
    *dv = scan_to_double(&ns);
    return true;
}

static bool literal(struct jp *j, const char *word, size_t n)
{
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return jp_fail(j, "bad literal");
    j->p += n;
    return true;
}

bool jp_bool(struct jp *j, bool *v)
{
    if (jp_peek(j) != JP_BOOL)
        return jp_fail(j, "expected a bool");
    if (*j->p == 't') {
        *v = true;
        return literal(j, "true", 4);
    }
    *v = false;
    return literal(j, "false", 5);
}

bool jp_null(struct jp *j)
{
    if (jp_peek(j) != JP_NULL)
        return jp_fail(j, "expected null");
    return literal(j, "null", 4);
}

bool jp_skip(struct jp *j)
{
    struct jstr s;
    int64_t iv;
    double dv;
    bool b;
    int r;

    switch (jp_peek(j)) {
    case JP_OBJECT:
        if (!jp_obj_begin(j))
            return false;
        while ((r = jp_obj_next(j, &s)) == 1) {
            free(s.s);
            if (!jp_skip(j))
                return false;
        }
        return r == 0;
    case JP_ARRAY:
        if (!jp_arr_begin(j))
            return false;
        while ((r = jp_arr_next(j)) == 1) {
            if (!jp_skip(j))
                return false;
        }
        return r == 0;
    case JP_STRING:
        if (!jp_string(j, &s))
            return false;
        free(s.s);
        return true;
    case JP_NUMBER:
        return jp_number(j, &b, &iv, &dv);
    case JP_BOOL:
        return jp_bool(j, &b);
    case JP_NULL:
        return jp_null(j);
    default:
        if (j->err == NULL && j->p >= j->end)
            return jp_fail(j, "truncated document");
        return jp_fail(j, "expected a value");
    }
}

bool jp_finish(struct jp *j)
{
    if (j->err)
        return false;
    skip_ws(j);
    if (j->p != j->end)
        return jp_fail(j, "trailing data after the document");
    return true;
}
