/* checkpoint.c: see checkpoint.h; the format is in the JSON Schema. */
#include "checkpoint.h"

#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "json_parse.h"

void checkpoint_state_init(struct checkpoint_state *st)
{
    kv_init(&st->params);
    kv_init(&st->vars);
    kv_init(&st->watermark);
    st->next_step = NULL;
    st->created_ms = 0;
    st->from_version[0] = '\0';
}

void checkpoint_state_clear(struct checkpoint_state *st)
{
    kv_clear(&st->params);
    kv_clear(&st->vars);
    kv_clear(&st->watermark);
    st->next_step = NULL;
    st->from_version[0] = '\0';
}

bool checkpoint_accepts(const struct ferry_app *app, const char *version)
{
    size_t n = strlen(version);
    const char *p = app->upgrades_from;

    if (strcmp(version, app->version) == 0)
        return true;
    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *q = p;

        while (len > 0 && *q == ' ') {   /* "1.0.0, 1.1.0" reads as meant */
            q++;
            len--;
        }
        while (len > 0 && q[len - 1] == ' ')
            len--;
        if (len == n && n > 0 && memcmp(q, version, n) == 0)
            return true;
        p = end ? end + 1 : NULL;
    }
    return false;
}

const char *checkpoint_find_step(const struct ferry_app *app, const char *name)
{
    if (app->mode == FERRY_MODE_EVENT)
        return strcmp(name, CHECKPOINT_EVENT_STEP) == 0 ? CHECKPOINT_EVENT_STEP
                                                        : NULL;
    for (const struct ferry_step *s = app->steps; s && s->name; s++) {
        if (strcmp(s->name, name) == 0)
            return s->name;
    }
    return NULL;
}

/* ---------------------------------------------------------------- write */

static const char *type_name(enum kv_type t)
{
    switch (t) {
    case KV_INT64: return "int64";
    case KV_FLOAT64: return "float64";
    case KV_BOOL: return "bool";
    case KV_STRING: return "string";
    case KV_BYTES: return "bytes";
    case KV_INT64_LIST: return "int64_list";
    case KV_FLOAT64_LIST: return "float64_list";
    }
    return "?";
}

static void write_value(struct jw *w, const struct kv_value *v)
{
    jw_obj_begin(w);
    jw_key(w, "type");
    jw_str(w, type_name(v->type));
    switch (v->type) {
    case KV_INT64:
        jw_key(w, "value");
        jw_i64(w, v->u.i);
        break;
    case KV_FLOAT64:
        jw_key(w, "bits");
        jw_f64_bits(w, v->u.f);
        break;
    case KV_BOOL:
        jw_key(w, "value");
        jw_bool(w, v->u.b);
        break;
    case KV_STRING:
        jw_key(w, "value");
        jw_str_n(w, v->u.arr.p, v->u.arr.n);
        break;
    case KV_BYTES:
        jw_key(w, "base64");
        jw_base64(w, v->u.arr.p, v->u.arr.n);
        break;
    case KV_INT64_LIST: {
        const int64_t *a = v->u.arr.p;
        jw_key(w, "value");
        jw_arr_begin(w);
        for (size_t i = 0; i < v->u.arr.n; i++)
            jw_i64(w, a[i]);
        jw_arr_end(w);
        break;
    }
    case KV_FLOAT64_LIST:
        /* Format version 2: the IEEE-754 bits of each element, 8 bytes
         * little-endian, concatenated, in base64 (10.7 characters per
         * element instead of 19 for a hex string). */
        jw_key(w, "base64");
        jw_base64_le64(w, v->u.arr.p, v->u.arr.n);
        break;
    }
    jw_obj_end(w);
}

static void write_typed_map(struct jw *w, const struct kv *m)
{
    jw_obj_begin(w);
    for (size_t i = 0; i < m->n; i++) {
        jw_key_n(w, m->e[i].key, m->e[i].key_len);
        write_value(w, &m->e[i].v);
    }
    jw_obj_end(w);
}

void checkpoint_write(struct jw *w, const struct ferry_app *app,
                      const struct checkpoint_state *st)
{
    jw_obj_begin(w);
    jw_key(w, "format");
    jw_str(w, CHECKPOINT_FORMAT);
    jw_key(w, "format_version");
    jw_i64(w, CHECKPOINT_FORMAT_VERSION);
    jw_key(w, "app");
    jw_obj_begin(w);
    jw_key(w, "name");
    jw_str(w, app->name);
    jw_key(w, "version");
    jw_str(w, app->version);
    jw_obj_end(w);
    jw_key(w, "mode");
    jw_str(w, app->mode == FERRY_MODE_EVENT ? "event" : "procedural");
    jw_key(w, "created_ms");
    jw_i64(w, st->created_ms);
    jw_key(w, "next_step");
    if (st->next_step)
        jw_str(w, st->next_step);
    else
        jw_null(w);
    jw_key(w, "params");
    write_typed_map(w, &st->params);
    jw_key(w, "vars");
    write_typed_map(w, &st->vars);
    jw_key(w, "watermark");
    jw_obj_begin(w);
    for (size_t i = 0; i < st->watermark.n; i++) {
        jw_key_n(w, st->watermark.e[i].key, st->watermark.e[i].key_len);
        jw_i64(w, st->watermark.e[i].v.u.i);
    }
    jw_obj_end(w);
    jw_obj_end(w);
}

/* ----------------------------------------------------------------- read */

static bool parse_type(const char *s, enum kv_type *t)
{
    static const enum kv_type all[] = {
        KV_INT64, KV_FLOAT64, KV_BOOL, KV_STRING, KV_BYTES, KV_INT64_LIST,
        KV_FLOAT64_LIST,
    };

    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        if (strcmp(s, type_name(all[i])) == 0) {
            *t = all[i];
            return true;
        }
    }
    return false;
}

/*
 * Encodings that differ between format versions. Only float64_list does:
 * version 1 wrote {"bits": [<16 hex digits>, ...]}, version 2 writes
 * {"base64": "<little-endian bytes>"}. The reader notes which forms a
 * document used and checks them against its format_version at the end
 * (members come in any order, so the version may follow the values).
 */
enum payload_form {
    FORM_BAD = -1,   /* the member does not belong to the type */
    FORM_ANY = 0,    /* the same in every version */
    FORM_V1 = 1,
    FORM_V2 = 2
};

static enum payload_form payload_form(enum kv_type t, const char *member)
{
    const char *want;

    switch (t) {
    case KV_FLOAT64_LIST:
        if (strcmp(member, "base64") == 0)
            return FORM_V2;
        if (strcmp(member, "bits") == 0)
            return FORM_V1;
        return FORM_BAD;
    case KV_FLOAT64:
        want = "bits";
        break;
    case KV_BYTES:
        want = "base64";
        break;
    default:
        want = "value";
        break;
    }
    return strcmp(member, want) == 0 ? FORM_ANY : FORM_BAD;
}

static bool read_f64_bits(struct jp *j, double *out)
{
    const char *s;
    size_t n;
    uint64_t bits;

    if (!jp_string_raw(j, &s, &n))
        return false;
    if (!hex64_decode(s, n, &bits))
        return jp_fail(j, "float64 bits must be 16 hex digits");
    memcpy(out, &bits, sizeof(*out));
    return true;
}

/* Reads a JSON array of int64 (is_f64 false) or of float64 bit strings
 * (the format version 1 float64_list). */
static bool read_list(struct jp *j, struct kv_value *v, bool is_f64)
{
    size_t n = 0, cap = 0;
    void *a = NULL;
    int r;

    if (!jp_arr_begin(j))
        return false;
    while ((r = jp_arr_next(j)) == 1) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            void *na;
            if (ncap > KV_MAX_ELEMS) {
                free(a);
                return jp_fail(j, "list too long");
            }
            na = realloc(a, ncap * 8);
            if (na == NULL) {
                free(a);
                return jp_fail(j, "out of memory");
            }
            a = na;
            cap = ncap;
        }
        if (is_f64 ? !read_f64_bits(j, (double *)a + n)
                   : !jp_int64(j, (int64_t *)a + n)) {
            free(a);
            return false;
        }
        n++;
    }
    if (r != 0) {
        free(a);
        return false;
    }
    if (a == NULL) {
        /* Empty lists still own a block, so getters return non-NULL. */
        a = malloc(1);
        if (a == NULL)
            return jp_fail(j, "out of memory");
    }
    v->type = is_f64 ? KV_FLOAT64_LIST : KV_INT64_LIST;
    v->u.arr.p = a;
    v->u.arr.n = n;
    return true;
}

/*
 * A float64_list in format version 2: strict base64 of 8 little-endian
 * bytes per element. A length that is not a whole number of elements, or
 * more than KV_MAX_ELEMS elements, is refused before anything is stored.
 */
static bool read_f64_list_base64(struct jp *j, struct kv_value *v)
{
    const char *s;
    size_t n, out_len;
    uint8_t *buf;
    double *a;

    if (!jp_string_raw(j, &s, &n))
        return false;
    if (n / 4 * 3 / 8 > KV_MAX_ELEMS)
        return jp_fail(j, "list too long");
    /* Never empty, so an empty list still owns a block (getters return
     * non-NULL). malloc's alignment suits double. */
    buf = malloc(n / 4 * 3 + 1);
    if (buf == NULL)
        return jp_fail(j, "out of memory");
    if (!base64_decode(s, n, buf, &out_len)) {
        free(buf);
        return jp_fail(j, "float64_list must be strict base64");
    }
    if (out_len % 8 != 0) {
        free(buf);
        return jp_fail(j, "float64_list base64 must hold a multiple of 8 bytes");
    }
    a = (double *)(void *)buf;
    for (size_t i = 0; i < out_len / 8; i++) {
        uint64_t bits = le64_load(buf + i * 8);
        memcpy(&a[i], &bits, sizeof(bits));
    }
    v->type = KV_FLOAT64_LIST;
    v->u.arr.p = buf;
    v->u.arr.n = out_len / 8;
    return true;
}

static bool read_payload(struct jp *j, enum kv_type t, enum payload_form form,
                         struct kv_value *v)
{
    switch (t) {
    case KV_INT64:
        v->type = t;
        return jp_int64(j, &v->u.i);
    case KV_FLOAT64:
        v->type = t;
        return read_f64_bits(j, &v->u.f);
    case KV_BOOL:
        v->type = t;
        return jp_bool(j, &v->u.b);
    case KV_STRING: {
        struct jstr s;
        if (!jp_string(j, &s))
            return false;
        v->type = t;
        v->u.arr.p = s.s;
        v->u.arr.n = s.n;
        return true;
    }
    case KV_BYTES: {
        const char *s;
        size_t n, out_len;
        uint8_t *buf;

        if (!jp_string_raw(j, &s, &n))
            return false;
        if (n / 4 * 3 > KV_MAX_ELEMS)
            return jp_fail(j, "bytes too long");
        buf = malloc(n / 4 * 3 + 1);
        if (buf == NULL)
            return jp_fail(j, "out of memory");
        if (!base64_decode(s, n, buf, &out_len)) {
            free(buf);
            return jp_fail(j, "bytes must be strict base64");
        }
        v->type = t;
        v->u.arr.p = buf;
        v->u.arr.n = out_len;
        return true;
    }
    case KV_INT64_LIST:
        return read_list(j, v, false);
    case KV_FLOAT64_LIST:
        return form == FORM_V2 ? read_f64_list_base64(j, v)
                               : read_list(j, v, true);
    }
    return jp_fail(j, "unknown type");
}

/* The payload member names a typed value may use, as static strings. */
static const char *payload_name(const char *key)
{
    static const char *names[] = {"value", "bits", "base64"};

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(key, names[i]) == 0)
            return names[i];
    }
    return NULL;
}

/*
 * One typed value: {"type": T, "<payload member>": ...}, members in any
 * order. If the payload comes first we remember where it starts, skip it,
 * and parse it from there once the type is known. Adds the payload's
 * version-specific form, if any, to (*forms).
 */
static bool read_typed_value(struct jp *j, struct kv_value *v, unsigned *forms)
{
    struct jp payload_at;
    const char *payload_key = NULL;   /* static, from payload_name() */
    bool have_type = false, payload_done = false;
    enum kv_type t = KV_INT64;
    enum payload_form form;
    struct jstr key;
    int r;

    memset(&payload_at, 0, sizeof(payload_at));
    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        const char *pk = payload_name(key.s);
        bool is_type = strcmp(key.s, "type") == 0;
        bool ok;

        free(key.s);
        if (is_type && !have_type) {
            struct jstr tn;

            have_type = true;
            ok = jp_string(j, &tn);
            if (ok) {
                ok = parse_type(tn.s, &t) || jp_fail(j, "unknown value type");
                free(tn.s);
            }
        } else if (pk != NULL && payload_key == NULL && have_type) {
            /* The usual order (ours): parse in place. */
            payload_key = pk;
            payload_done = true;
            form = payload_form(t, pk);
            ok = (form != FORM_BAD ||
                  jp_fail(j, "wrong payload member for the value type")) &&
                 read_payload(j, t, form, v);
            if (ok)
                *forms |= (unsigned)form;
        } else if (pk != NULL && payload_key == NULL) {
            payload_key = pk;
            payload_at = *j;
            ok = jp_skip(j);
        } else {
            ok = jp_fail(j, "unexpected or duplicate member in a typed value");
        }
        if (ok && have_type && payload_key != NULL && !payload_done) {
            form = payload_form(t, payload_key);
            if (form == FORM_BAD) {
                ok = jp_fail(j, "wrong payload member for the value type");
            } else {
                ok = read_payload(&payload_at, t, form, v);
                if (!ok)
                    jp_fail(j, payload_at.err ? payload_at.err : "bad value");
                else
                    *forms |= (unsigned)form;
            }
            payload_done = true;
        }
        if (!ok) {
            kv_value_release(v);
            return false;
        }
    }
    if (r != 0 || !payload_done) {
        kv_value_release(v);
        return jp_fail(j, "a typed value needs \"type\" and its payload member");
    }
    return true;
}

/* {"<key>": <typed value>, ...} into (m); see read_typed_value(). */
static bool read_typed_map(struct jp *j, struct kv *m, unsigned *forms)
{
    struct jstr key;
    int r;

    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        struct kv_value tmp;
        struct kv_value *slot;
        bool created;

        memset(&tmp, 0, sizeof(tmp));
        if (!kv_key_valid(key.s, key.n)) {
            free(key.s);
            return jp_fail(j, "invalid variable name");
        }
        if (kv_find(m, key.s) != NULL) {
            free(key.s);
            return jp_fail(j, "duplicate variable name");
        }
        if (!read_typed_value(j, &tmp, forms)) {
            free(key.s);
            return false;
        }
        slot = kv_slot(m, key.s, false, &created);
        free(key.s);
        if (slot == NULL) {
            kv_value_release(&tmp);
            return jp_fail(j, "out of memory");
        }
        *slot = tmp;
    }
    return r == 0;
}

/* {"<source>": <seq >= 1>, ...} into (m). */
static bool read_watermark(struct jp *j, struct kv *m)
{
    struct jstr key;
    int r;

    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        struct kv_value *slot;
        bool created;
        int64_t seq;
        bool ok = kv_key_valid(key.s, key.n) ||
                  jp_fail(j, "invalid source id in the watermark");

        ok = ok && (kv_find(m, key.s) == NULL ||
                    jp_fail(j, "duplicate source in the watermark"));
        ok = ok && jp_int64(j, &seq);
        ok = ok && (seq >= 1 || jp_fail(j, "watermark seq must be >= 1"));
        if (ok) {
            slot = kv_slot(m, key.s, false, &created);
            if (slot == NULL) {
                ok = jp_fail(j, "out of memory");
            } else {
                slot->type = KV_INT64;
                slot->u.i = seq;
            }
        }
        free(key.s);
        if (!ok)
            return false;
    }
    return r == 0;
}

/* Reads a string member and compares it with (want). */
static bool expect_string(struct jp *j, const char *want, bool *matches)
{
    struct jstr s;

    if (!jp_string(j, &s))
        return false;
    *matches = strcmp(s.s, want) == 0;
    free(s.s);
    return true;
}

/* Why a document of another version was refused: built at read time. */
static char version_why[3 * CHECKPOINT_VERSION_MAX + 160];

static void why_append(size_t *at, const char *text, size_t n)
{
    if (n > sizeof(version_why) - 1 - *at)
        n = sizeof(version_why) - 1 - *at;
    memcpy(version_why + *at, text, n);
    *at += n;
    version_why[*at] = '\0';
}

static void why_put(size_t *at, const char *text)
{
    why_append(at, text, strlen(text));
}

/* "the checkpoint is of counter 1.0.0; counter 2.0.0 upgrades from: 1.5.0" */
static const char *explain_version(const struct ferry_app *app, const char *version,
                                   size_t version_len)
{
    size_t at = 0;

    why_put(&at, "the checkpoint is of ");
    why_put(&at, app->name);
    why_put(&at, " ");
    why_append(&at, version, version_len > CHECKPOINT_VERSION_MAX ? CHECKPOINT_VERSION_MAX
                                                                   : version_len);
    why_put(&at, "; ");
    why_put(&at, app->name);
    why_put(&at, " ");
    why_put(&at, app->version);
    if (app->upgrades_from != NULL && app->upgrades_from[0] != '\0') {
        why_put(&at, " upgrades only from: ");
        why_put(&at, app->upgrades_from);
    } else {
        why_put(&at, " restores no other version (ferry_app.upgrades_from)");
    }
    return version_why;
}

/* Reads "app". (*matches): the name is this app's; (*version_why): NULL if
 * this app restores the document's version, else why not. */
static bool read_app(struct jp *j, const struct ferry_app *app, bool *matches,
                     struct checkpoint_state *st, const char **version_refused)
{
    bool name_ok = false, version_ok = false, seen_name = false,
         seen_version = false;
    struct jstr key, version = {NULL, 0};
    int r;

    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        bool ok;
        if (strcmp(key.s, "name") == 0 && !seen_name) {
            seen_name = true;
            ok = expect_string(j, app->name, &name_ok);
        } else if (strcmp(key.s, "version") == 0 && !seen_version) {
            seen_version = true;
            ok = jp_string(j, &version);
        } else {
            ok = jp_fail(j, "unexpected member in \"app\"");
        }
        free(key.s);
        if (!ok) {
            free(version.s);
            return false;
        }
    }
    if (r != 0 || !seen_name || !seen_version) {
        free(version.s);
        return r == 0 ? jp_fail(j, "\"app\" needs \"name\" and \"version\"") : false;
    }
    *matches = name_ok;
    *version_refused = NULL;
    version_ok = version.n <= CHECKPOINT_VERSION_MAX &&
                 strlen(version.s) == version.n && checkpoint_accepts(app, version.s);
    if (!version_ok)
        *version_refused = explain_version(app, version.s, version.n);
    else if (strcmp(version.s, app->version) != 0)
        memcpy(st->from_version, version.s, version.n + 1);
    free(version.s);
    return true;
}

enum top_member {
    M_FORMAT = 1 << 0,
    M_FORMAT_VERSION = 1 << 1,
    M_APP = 1 << 2,
    M_MODE = 1 << 3,
    M_CREATED = 1 << 4,
    M_NEXT_STEP = 1 << 5,
    M_PARAMS = 1 << 6,
    M_VARS = 1 << 7,
    M_WATERMARK = 1 << 8,
    M_ALL = (1 << 9) - 1
};

static const struct {
    const char *name;
    enum top_member bit;
} top_members[] = {
    {"format", M_FORMAT},       {"format_version", M_FORMAT_VERSION},
    {"app", M_APP},             {"mode", M_MODE},
    {"created_ms", M_CREATED},  {"next_step", M_NEXT_STEP},
    {"params", M_PARAMS},       {"vars", M_VARS},
    {"watermark", M_WATERMARK},
};

/* Reads the top-level members. Identity mismatches are remembered in
 * (*wrong_app) rather than failing, so a malformed document is reported as
 * malformed even if it also names another app. */
static bool read_top(struct jp *j, const struct ferry_app *app,
                     struct checkpoint_state *st, bool *wrong_app,
                     const char **wrong_why)
{
    unsigned seen = 0, forms = 0;
    int64_t version = 0;
    struct jstr key;
    int r;

    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        enum top_member bit = 0;
        bool ok = true, match = true;

        for (size_t i = 0; i < sizeof(top_members) / sizeof(top_members[0]); i++) {
            if (strcmp(key.s, top_members[i].name) == 0)
                bit = top_members[i].bit;
        }
        free(key.s);
        if (bit == 0)
            return jp_fail(j, "unknown member in the checkpoint document");
        if (seen & bit)
            return jp_fail(j, "duplicate member in the checkpoint document");
        seen |= bit;
        switch (bit) {
        case M_FORMAT:
            ok = expect_string(j, CHECKPOINT_FORMAT, &match) &&
                 (match || jp_fail(j, "not a ferry checkpoint (\"format\")"));
            break;
        case M_FORMAT_VERSION:
            ok = jp_int64(j, &version) &&
                 ((version >= CHECKPOINT_FORMAT_VERSION_MIN &&
                   version <= CHECKPOINT_FORMAT_VERSION) ||
                  jp_fail(j, "unsupported format_version"));
            break;
        case M_APP: {
            const char *version_refused = NULL;
            ok = read_app(j, app, &match, st, &version_refused);
            if (ok && !match && !*wrong_app) {
                *wrong_app = true;
                *wrong_why = "the checkpoint is for another app";
            } else if (ok && version_refused != NULL && !*wrong_app) {
                *wrong_app = true;
                *wrong_why = version_refused;
            }
            break;
        }
        case M_MODE: {
            bool is_event, is_proc;
            const char *want = app->mode == FERRY_MODE_EVENT ? "event" : "procedural";
            const char *other = app->mode == FERRY_MODE_EVENT ? "procedural" : "event";
            struct jstr s;
            ok = jp_string(j, &s);
            if (!ok)
                break;
            is_event = strcmp(s.s, want) == 0;
            is_proc = strcmp(s.s, other) == 0;
            free(s.s);
            if (!is_event && !is_proc)
                ok = jp_fail(j, "mode must be \"event\" or \"procedural\"");
            else if (is_proc && !*wrong_app) {
                *wrong_app = true;
                *wrong_why = "the checkpoint is for an app of another mode";
            }
            break;
        }
        case M_CREATED:
            ok = jp_int64(j, &st->created_ms) &&
                 (st->created_ms >= 0 || jp_fail(j, "created_ms must be >= 0"));
            break;
        case M_NEXT_STEP:
            if (jp_peek(j) == JP_NULL) {
                ok = jp_null(j);
                st->next_step = NULL;
                if (ok && app->mode == FERRY_MODE_EVENT)
                    ok = jp_fail(j, "an event-mode checkpoint needs a next_step");
            } else {
                struct jstr s;
                ok = jp_string(j, &s);
                if (!ok)
                    break;
                st->next_step = checkpoint_find_step(app, s.s);
                free(s.s);
                if (st->next_step == NULL && !*wrong_app) {
                    *wrong_app = true;
                    *wrong_why = "next_step names a step this app does not have";
                }
            }
            break;
        case M_PARAMS:
            ok = read_typed_map(j, &st->params, &forms);
            break;
        case M_VARS:
            ok = read_typed_map(j, &st->vars, &forms);
            break;
        case M_WATERMARK:
            ok = read_watermark(j, &st->watermark);
            break;
        default:
            ok = false;
        }
        if (!ok)
            return false;
    }
    if (r != 0)
        return false;
    if (seen != M_ALL)
        return jp_fail(j, "the checkpoint document lacks a required member");
    if (version == 1 && (forms & FORM_V2))
        return jp_fail(j, "a format_version 1 float64_list takes \"bits\"");
    if (version == 2 && (forms & FORM_V1))
        return jp_fail(j, "a format_version 2 float64_list takes \"base64\"");
    return true;
}

bool checkpoint_read(const char *text, size_t n, const struct ferry_app *app,
                     struct checkpoint_state *st, struct checkpoint_error *err)
{
    struct jp j;
    bool wrong_app = false;
    const char *wrong_why = NULL;

    jp_init(&j, text, n);
    if (!read_top(&j, app, st, &wrong_app, &wrong_why) || !jp_finish(&j)) {
        err->code = "bad_document";
        err->message = j.err ? j.err : "malformed checkpoint document";
        return false;
    }
    if (wrong_app) {
        err->code = "wrong_app";
        err->message = wrong_why;
        return false;
    }
    return true;
}
