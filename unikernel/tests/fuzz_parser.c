/*
 * fuzz_parser: feeds documents to the checkpoint parser and the scalar
 * object parser, for tests/unikernel/test_fuzz.py. Build with `make fuzz`
 * (AddressSanitizer + UBSan): any memory error or undefined behaviour
 * aborts the run.
 *
 * stdin: records of a 4-byte little-endian length and that many bytes.
 * For each record: parse it as a checkpoint for an event app ("counter")
 * and a procedural app ("procedural"); when accepted, write it back and
 * check that the rewrite parses to the same bytes again (a fixpoint). Also
 * parse the record as a START params object.
 * stdout: "accepted=N rejected=M".
 * Exit: 0, or 1 if a round trip is not a fixpoint.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/checkpoint.h"
#include "../core/json_parse.h"
#include "../core/scalars.h"

static const struct ferry_step steps[] = {
    {"init", NULL}, {"generate", NULL}, {NULL, NULL},
};

static const struct ferry_app event_app = {
    .name = "counter", .version = "1.0.0", .mode = FERRY_MODE_EVENT,
};

static const struct ferry_app proc_app = {
    .name = "procedural", .version = "1.0.0", .mode = FERRY_MODE_PROCEDURAL,
    .steps = steps, .first_step = "init",
};

static int round_trip(const struct ferry_app *app, const char *doc, size_t n,
                      long *accepted, long *rejected)
{
    struct checkpoint_state st, st2;
    struct checkpoint_error err;
    struct jw w1, w2;
    int bad = 0;

    checkpoint_state_init(&st);
    if (!checkpoint_read(doc, n, app, &st, &err)) {
        if (err.code == NULL || err.message == NULL)
            bad = 1;
        checkpoint_state_clear(&st);
        ++*rejected;
        return bad;
    }
    ++*accepted;
    jw_init(&w1, 0);
    checkpoint_write(&w1, app, &st);
    checkpoint_state_init(&st2);
    if (w1.failed || !checkpoint_read(w1.buf, w1.len, app, &st2, &err)) {
        fprintf(stderr, "rewrite not accepted: %s\n", w1.failed ? "oom" : err.message);
        bad = 1;
    } else {
        jw_init(&w2, 0);
        checkpoint_write(&w2, app, &st2);
        if (w2.len != w1.len || memcmp(w1.buf, w2.buf, w1.len) != 0) {
            fprintf(stderr, "rewrite is not a fixpoint\n");
            bad = 1;
        }
        jw_free(&w2);
    }
    jw_free(&w1);
    checkpoint_state_clear(&st);
    checkpoint_state_clear(&st2);
    return bad;
}

int main(void)
{
    long accepted = 0, rejected = 0;
    int bad = 0;
    unsigned char hdr[4];

    while (fread(hdr, 1, 4, stdin) == 4) {
        size_t n = (size_t)hdr[0] | (size_t)hdr[1] << 8 | (size_t)hdr[2] << 16 |
                   (size_t)hdr[3] << 24;
        /* Exactly n bytes, so ASan catches reads past the document. */
        char *doc = malloc(n ? n : 1);
        struct jp j;
        struct kv params;

        if (doc == NULL || fread(doc, 1, n, stdin) != n) {
            free(doc);
            break;
        }
        bad |= round_trip(&event_app, doc, n, &accepted, &rejected);
        bad |= round_trip(&proc_app, doc, n, &accepted, &rejected);
        kv_init(&params);
        jp_init(&j, doc, n);
        if (scalars_read(&j, &params, false))
            jp_finish(&j);
        kv_clear(&params);
        free(doc);
    }
    printf("accepted=%ld rejected=%ld\n", accepted, rejected);
    return bad;
}
