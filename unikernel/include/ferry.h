/*
 * ferry.h: the Ferry guest SDK, the whole API an app sees.
 *
 * An app is one C file that defines `const struct ferry_app ferry_app` and
 * uses the functions below. It never touches the platform, the channel or
 * the checkpoint format: the same file builds for every target (unix,
 * microvm) with no #ifdef.
 *
 * STATE. Everything that must survive a migration lives in the typed
 * key/value store (ferry_get_* / ferry_set_*). C globals and statics do
 * NOT survive: after a RESTORE the app finds exactly the store, its
 * parameters and its watermark as they were at the checkpoint. Keys are
 * non-empty UTF-8 strings of at most FERRY_KEY_MAX bytes.
 *
 * STEPS. A checkpoint is only ever taken between two steps.
 *  - Procedural mode: the app lists named step functions; each runs to
 *    completion and returns the name of the next step (NULL: finished).
 *  - Event mode: the app gives one input handler; each input is one step.
 *    Every input carries a source id and a sequence number; the runtime
 *    keeps, per source, the last applied sequence number (the watermark),
 *    saves it in the checkpoint, and drops inputs at or below it without
 *    calling the handler. So an input is applied at most once, even when it
 *    is delivered again after a migration.
 *
 * DETERMINISM. Given the same parameters, store and inputs, a step must
 * produce the same store and outputs. The API offers no clock and no
 * randomness for that reason.
 *
 * Results. Functions that can fail return a ferry_result_t:
 *   FERRY_OK      success.
 *   FERRY_EINVAL  a bad argument (NULL or invalid key, invalid UTF-8, a
 *                 call outside the context it is meant for).
 *   FERRY_ENOMEM  out of memory; the store is unchanged.
 * Getters never fail: they return the caller's default when the key is
 * absent or holds another type.
 */
#ifndef FERRY_H
#define FERRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    FERRY_OK = 0,
    FERRY_EINVAL,
    FERRY_ENOMEM
} ferry_result_t;

/* Longest key, in bytes, for the store, params, inputs and outputs. */
#define FERRY_KEY_MAX 256

/* ---------------------------------------------------------------------- */
/* The app definition                                                      */

typedef enum {
    FERRY_MODE_EVENT = 1,
    FERRY_MODE_PROCEDURAL = 2
} ferry_mode_t;

/*
 * A procedural step: runs to completion, returns the name of the next step
 * (one of the app's `steps`, static storage) or NULL when the app is done.
 * Returning an unknown name ends the guest with an error.
 */
typedef const char *(*ferry_step_fn)(void);

struct ferry_step {
    const char *name;
    ferry_step_fn fn;
};

/*
 * A declared parameter: its name, type, default and a one-line doc. The
 * declaration is the one source of truth: the guest reports it in HELLO,
 * `ferry image push` records it, `ferry image show APP` lists it, deploy
 * refuses an undeclared name or a value of the wrong type, and the
 * ferry_param_*() getters return the declared default when the parameter
 * was not given. Declare with the FERRY_PARAM_* macros below; end the list
 * with FERRY_PARAMS_END.
 */
typedef enum {
    FERRY_PARAM_TYPE_I64 = 1,
    FERRY_PARAM_TYPE_F64,
    FERRY_PARAM_TYPE_BOOL,
    FERRY_PARAM_TYPE_STR
} ferry_param_type_t;

struct ferry_param {
    const char *name;
    ferry_param_type_t type;
    union {
        int64_t i64;
        double f64;
        bool b;
        const char *str;
    } dflt;
    const char *doc;
};

#define FERRY_PARAM_I64(n, d, text) \
    {.name = (n), .type = FERRY_PARAM_TYPE_I64, .dflt.i64 = (d), .doc = (text)}
#define FERRY_PARAM_F64(n, d, text) \
    {.name = (n), .type = FERRY_PARAM_TYPE_F64, .dflt.f64 = (d), .doc = (text)}
#define FERRY_PARAM_BOOL(n, d, text) \
    {.name = (n), .type = FERRY_PARAM_TYPE_BOOL, .dflt.b = (d), .doc = (text)}
#define FERRY_PARAM_STR(n, d, text) \
    {.name = (n), .type = FERRY_PARAM_TYPE_STR, .dflt.str = (d), .doc = (text)}
#define FERRY_PARAMS_END {.name = NULL}

/*
 * The one definition every app provides, named `ferry_app`.
 *  name, version   identify the app; a checkpoint restores only into the
 *                  same name, and the same version unless upgrades_from
 *                  lists the checkpoint's version.
 *  mode            FERRY_MODE_EVENT or FERRY_MODE_PROCEDURAL.
 *  on_start        optional; runs once on a fresh START (never on RESTORE),
 *                  after the parameters are readable. Use it to set the
 *                  initial store.
 *  on_input        event mode: runs once per input that is not dropped.
 *  steps, first_step
 *                  procedural mode: the step table (ended by {NULL, NULL})
 *                  and the name of the step a fresh START runs first.
 *  params          optional: the parameters the app reads, ended by
 *                  FERRY_PARAMS_END (see struct ferry_param). An app that
 *                  declares none (NULL) takes any parameter, unchecked.
 *  upgrades_from   optional: the other versions of this app whose
 *                  checkpoints this version restores, comma-separated
 *                  (e.g. "1.0.0,1.1.0"). A checkpoint of a version not
 *                  listed (older or newer) is refused (`wrong_app`): so a
 *                  downgrade is refused unless the older version lists the
 *                  newer one. NULL: only the same version.
 *  upgrade         optional: runs once after the RESTORE of a checkpoint
 *                  written by another version (one in upgrades_from),
 *                  before any input or step, with that version. The store,
 *                  params and watermark are the old version's; the hook may
 *                  read and change the store (ferry_get_* / ferry_set_* /
 *                  ferry_del, ferry_next_key to walk it) but sends no
 *                  output (ferry_emit() is FERRY_EINVAL). It returns NULL
 *                  to accept, or a message (static storage) saying why it
 *                  refuses this state: the guest then ends with
 *                  `upgrade_refused` and the host keeps the old version.
 *                  Like a step, it must be deterministic. Without a hook, a
 *                  listed version's store is taken as it is.
 */
struct ferry_app {
    const char *name;
    const char *version;
    ferry_mode_t mode;
    void (*on_start)(void);
    void (*on_input)(void);
    const struct ferry_step *steps;
    const char *first_step;
    const struct ferry_param *params;
    const char *upgrades_from;
    const char *(*upgrade)(const char *from_version);
};

extern const struct ferry_app ferry_app;

/* ---------------------------------------------------------------------- */
/* The store: all state that survives migration                            */

/*
 * Returns the int64 stored at (key), or (dflt) if the key is absent or
 * holds another type.
 */
int64_t ferry_get_i64(const char *key, int64_t dflt);

/* Stores (value) as an int64 at (key), replacing any previous value. */
ferry_result_t ferry_set_i64(const char *key, int64_t value);

/*
 * Writes "<prefix><name>" to (out) and returns (out): the key of state kept
 * per device or sensor, e.g. ferry_key(k, "count/", device). What does not
 * fit in FERRY_KEY_MAX bytes is cut off.
 */
const char *ferry_key(char out[FERRY_KEY_MAX + 1], const char *prefix,
                      const char *name);

/*
 * Returns the float64 stored at (key), or (dflt) if the key is absent or
 * holds another type. Checkpoints keep the exact bit pattern (NaN too).
 */
double ferry_get_f64(const char *key, double dflt);

/* Stores (value) as a float64 at (key), replacing any previous value. */
ferry_result_t ferry_set_f64(const char *key, double value);

/* Returns the bool stored at (key), or (dflt). */
bool ferry_get_bool(const char *key, bool dflt);

/* Stores (value) as a bool at (key), replacing any previous value. */
ferry_result_t ferry_set_bool(const char *key, bool value);

/*
 * Returns the string stored at (key), or (dflt). The pointer stays valid
 * until the next call that changes the store.
 */
const char *ferry_get_str(const char *key, const char *dflt);

/*
 * Stores a copy of the NUL-terminated UTF-8 string (value) at (key).
 * FERRY_EINVAL if (value) is NULL or not valid UTF-8.
 */
ferry_result_t ferry_set_str(const char *key, const char *value);

/*
 * Returns the bytes stored at (key) and their count in (*len), or NULL
 * (and *len = 0) if absent or of another type. Valid until the next call
 * that changes the store. A zero-length value returns a non-NULL pointer.
 */
const uint8_t *ferry_get_bytes(const char *key, size_t *len);

/* Stores a copy of (len) bytes from (data) at (key). */
ferry_result_t ferry_set_bytes(const char *key, const void *data, size_t len);

/*
 * Returns the int64 list stored at (key) and its length in (*len), or NULL
 * (and *len = 0) if absent or of another type. Valid until the next call
 * that changes the store.
 */
const int64_t *ferry_get_i64_list(const char *key, size_t *len);

/* Stores a copy of the (len) elements of (values) at (key). */
ferry_result_t ferry_set_i64_list(const char *key, const int64_t *values,
                                  size_t len);

/* As ferry_get_i64_list(), for float64 lists. */
const double *ferry_get_f64_list(const char *key, size_t *len);

/* As ferry_set_i64_list(), for float64 lists. */
ferry_result_t ferry_set_f64_list(const char *key, const double *values,
                                  size_t len);

/*
 * Makes (key) an int64 list of exactly (len) elements and returns a
 * writable pointer to them, for updating large lists in place. Existing
 * elements of an int64 list are kept, new ones are zero; a value of another
 * type is replaced. Returns NULL on a bad key or out of memory (store
 * unchanged). Valid until the next call that changes the store. For
 * len == 0 returns a non-NULL pointer that must not be dereferenced.
 */
int64_t *ferry_i64_list_mut(const char *key, size_t len);

/* As ferry_i64_list_mut(), for float64 lists. */
double *ferry_f64_list_mut(const char *key, size_t len);

/*
 * Walks the store: returns the first key that starts with (prefix) and
 * sorts after (after) in byte order (after NULL or "": the first key with
 * the prefix), or NULL when there is none. So
 *
 *     char k[FERRY_KEY_MAX + 1] = "";
 *     const char *next;
 *     while ((next = ferry_next_key("count/", k)) != NULL) {
 *         ferry_key(k, "", next);      (a copy: the store may change now)
 *         ...
 *     }
 *
 * visits every "count/..." key once, in order. The pointer returned is
 * valid until the next call that changes the store. Keys added while
 * walking are visited if they sort after the current one.
 */
const char *ferry_next_key(const char *prefix, const char *after);

/* Returns true if (key) holds a value of any type. */
bool ferry_exists(const char *key);

/* Removes (key). Removing an absent key is FERRY_OK. */
ferry_result_t ferry_del(const char *key);

/* ---------------------------------------------------------------------- */
/* Parameters (the `params` of START; kept in every checkpoint)            */

/*
 * Return the parameter (key), or its default if it is absent or of another
 * type: the declared default when the app declares (key) with this type
 * (an int64 declaration also serves ferry_param_f64()), else (dflt). So an
 * app that declares its parameters may pass any (dflt), e.g. 0 or NULL.
 * A number written without fraction or exponent is an integer and is
 * also readable with ferry_param_f64(); any other number is readable only
 * with ferry_param_f64(). Strings are valid for the life of the guest.
 */
int64_t ferry_param_i64(const char *key, int64_t dflt);
double ferry_param_f64(const char *key, double dflt);
bool ferry_param_bool(const char *key, bool dflt);
const char *ferry_param_str(const char *key, const char *dflt);

/* ---------------------------------------------------------------------- */
/* The current input (event mode, inside on_input only)                    */

/* Returns the source id of the input being handled ("" outside on_input). */
const char *ferry_input_source(void);

/* Returns the sequence number of the input being handled (0 outside). */
int64_t ferry_input_seq(void);

/*
 * Return the top-level member (key) of the input's JSON payload, or (dflt)
 * if it is absent or of another type. Numbers follow the same rule as
 * parameters. Nested objects and arrays are not readable. Strings are valid
 * until on_input returns.
 */
int64_t ferry_input_i64(const char *key, int64_t dflt);
double ferry_input_f64(const char *key, double dflt);
bool ferry_input_bool(const char *key, bool dflt);
const char *ferry_input_str(const char *key, const char *dflt);

/* Returns true if the payload has a top-level member (key). */
bool ferry_input_has(const char *key);

/* ---------------------------------------------------------------------- */
/* Outputs                                                                 */

/*
 * Add one member (key) to the pending output object. Members appear in the
 * order added; adding the same key twice is the caller's mistake (both are
 * sent). float64 is written in decimal with 15 significant digits (NaN
 * and infinities as null): outputs are for consumers, the exact value lives
 * in the store.
 */
ferry_result_t ferry_out_i64(const char *key, int64_t value);
ferry_result_t ferry_out_f64(const char *key, double value);
ferry_result_t ferry_out_bool(const char *key, bool value);
ferry_result_t ferry_out_str(const char *key, const char *value);

/*
 * Sends the pending output object as one OUTPUT frame, tagged with the
 * current input's source and seq (null in procedural mode), and starts a
 * new empty one. Sending an empty object is allowed. If the channel fails
 * the runtime ends the guest; this function then does not return.
 */
ferry_result_t ferry_emit(void);

/* ---------------------------------------------------------------------- */
/* Pacing, logging, failure                                                */

/*
 * Procedural mode: asks the runtime to wait at least (ms) milliseconds
 * before running the next step. The runtime serves the channel during the
 * wait (a checkpoint is answered at once) and does not burn the CPU where
 * the target can sleep. The wait is not part of the state: after a
 * restore the next step runs at once. No effect in event mode.
 */
void ferry_defer_next_step(uint32_t ms);

typedef enum {
    FERRY_LOG_DEBUG,
    FERRY_LOG_INFO,
    FERRY_LOG_WARN,
    FERRY_LOG_ERROR
} ferry_log_level_t;

/*
 * Sends (msg), a NUL-terminated string, to the host as a LOG frame and to
 * the platform console. Invalid UTF-8 bytes are replaced by '?'.
 */
void ferry_log(ferry_log_level_t level, const char *msg);

/*
 * Ends the guest because the app cannot go on: sends ERROR with code
 * "app_failed" and (msg), then EXITED with code 1. Never returns.
 */
void ferry_fail(const char *msg) __attribute__((noreturn));

#endif /* FERRY_H */
