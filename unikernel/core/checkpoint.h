/*
 * checkpoint.h: the checkpoint document (schemas/checkpoint.schema.json),
 * written from and read into the runtime's state.
 */
#ifndef FERRY_CHECKPOINT_H
#define FERRY_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../include/ferry.h"
#include "json_write.h"
#include "kv.h"

#define CHECKPOINT_FORMAT "ferry-checkpoint"
/* The version written. 2: float64_list as base64 of little-endian bytes. */
#define CHECKPOINT_FORMAT_VERSION 2
/* The oldest version still read (1: float64_list as hex strings). */
#define CHECKPOINT_FORMAT_VERSION_MIN 1
/* The step name event-mode apps report: each input is a step. */
#define CHECKPOINT_EVENT_STEP "input"

/* The longest app version a checkpoint may name for an upgrade. */
#define CHECKPOINT_VERSION_MAX 64

/* What a checkpoint holds. Strings point into the app definition. */
struct checkpoint_state {
    struct kv params;
    struct kv vars;
    struct kv watermark;     /* KV_INT64 per source */
    const char *next_step;   /* NULL: a finished procedural app */
    int64_t created_ms;
    /* Read only: the version that wrote the document when it is another
     * version the app upgrades from ("" otherwise). */
    char from_version[CHECKPOINT_VERSION_MAX + 1];
};

/* Appends the document for (app) and (st) to (w). */
void checkpoint_write(struct jw *w, const struct ferry_app *app,
                      const struct checkpoint_state *st);

/* Why a document was refused: a PROTOCOL.md error code and a message. */
struct checkpoint_error {
    const char *code;      /* "bad_document" or "wrong_app" */
    const char *message;   /* static text (valid until the next read) */
};

/*
 * Parses (text, n) strictly for (app). On success fills (st), which must be
 * freshly initialised (empty maps), and returns true. On failure returns
 * false, fills (err), and leaves (st) for checkpoint_state_clear().
 */
bool checkpoint_read(const char *text, size_t n, const struct ferry_app *app,
                     struct checkpoint_state *st, struct checkpoint_error *err);

/* True if (app) restores a checkpoint written by (version) of itself: its
 * own version, or one listed in its upgrades_from. */
bool checkpoint_accepts(const struct ferry_app *app, const char *version);

void checkpoint_state_init(struct checkpoint_state *st);
void checkpoint_state_clear(struct checkpoint_state *st);

/* The app's step named (name) (static storage), or NULL. Event-mode apps
 * know only CHECKPOINT_EVENT_STEP. */
const char *checkpoint_find_step(const struct ferry_app *app, const char *name);

#endif /* FERRY_CHECKPOINT_H */
