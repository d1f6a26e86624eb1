/* scalars.c: see scalars.h. */
#include "scalars.h"

#include <stdlib.h>
#include <string.h>

static bool read_member(struct jp *j, struct kv *out, const char *key,
                        bool skip_nested)
{
    struct kv_value *v;
    bool created;
    enum jp_kind kind = jp_peek(j);

    if (kind == JP_OBJECT || kind == JP_ARRAY || kind == JP_NULL) {
        if (!skip_nested)
            return jp_fail(j, "a parameter must be a number, string or bool");
        return jp_skip(j);
    }
    if (kv_find(out, key) != NULL)
        return jp_fail(j, "duplicate member name");
    v = kv_slot(out, key, false, &created);
    if (v == NULL)
        return jp_fail(j, "invalid member name or out of memory");
    switch (kind) {
    case JP_NUMBER: {
        bool is_int;
        int64_t iv;
        double dv;

        if (!jp_number(j, &is_int, &iv, &dv))
            break;
        if (is_int) {
            v->type = KV_INT64;
            v->u.i = iv;
        } else {
            v->type = KV_FLOAT64;
            v->u.f = dv;
        }
        return true;
    }
    case JP_STRING: {
        struct jstr s;

        if (!jp_string(j, &s))
            break;
        v->type = KV_STRING;
        v->u.arr.p = s.s;
        v->u.arr.n = s.n;
        return true;
    }
    case JP_BOOL:
        if (!jp_bool(j, &v->u.b))
            break;
        v->type = KV_BOOL;
        return true;
    default:
        jp_fail(j, "expected a value");
        break;
    }
    kv_delete(out, key);
    return false;
}

bool scalars_read(struct jp *j, struct kv *out, bool skip_nested)
{
    struct jstr key;
    int r;

    if (!jp_obj_begin(j))
        return false;
    while ((r = jp_obj_next(j, &key)) == 1) {
        bool ok = read_member(j, out, key.s, skip_nested);
        free(key.s);
        if (!ok)
            return false;
    }
    return r == 0;
}
