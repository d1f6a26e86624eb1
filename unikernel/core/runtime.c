/*
 * runtime.c: ferry_runtime_main(), the protocol loop of
 * unikernel/PROTOCOL.md: HELLO, START/RESTORE, steps or inputs,
 * checkpoints at step boundaries, STOP.
 */
#include "runtime.h"

#include <stdlib.h>
#include <string.h>

#include "../platform/platform.h"
#include "frame.h"
#include "json_parse.h"
#include "scalars.h"

struct runtime rt;

void rt_console(const char *msg)
{
    plat_console("ferry: ", 7);
    plat_console(msg, strlen(msg));
    plat_console("\n", 1);
}

void rt_send(uint8_t type, struct jw *w)
{
    if (w->failed) {
        jw_free(w);
        rt_fatal("out_of_memory", "cannot build a frame", RT_EXIT_NO_MEMORY);
    }
    if (!rt.chan_broken && frame_send(type, w) != 0) {
        rt.chan_broken = true;
        rt_console("channel write failed; waiting for the controller to go");
    }
    jw_free(w);
}

/* rt_send() for the way out: a frame that cannot be built or sent is dropped,
 * since failing again here would recurse into rt_fatal(). */
static void send_best_effort(uint8_t type, struct jw *w)
{
    if (!w->failed && !rt.chan_broken)
        frame_send(type, w);
    jw_free(w);
}

void rt_fatal(const char *code, const char *message, int exit_code)
{
    struct jw w;

    rt_console(message);
    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "code");
    jw_str(&w, code);
    jw_key(&w, "message");
    jw_str(&w, message);
    jw_obj_end(&w);
    send_best_effort(FRAME_ERROR, &w);
    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "code");
    jw_i64(&w, exit_code);
    jw_key(&w, "reason");
    jw_str(&w, code);
    jw_obj_end(&w);
    send_best_effort(FRAME_EXITED, &w);
    plat_exit(exit_code);
}

void rt_out_reset(void)
{
    if (rt.out_open)
        jw_free(&rt.out);
    jw_init(&rt.out, 0);
    jw_obj_begin(&rt.out);
    rt.out_open = true;
}

static const char *mode_name(void)
{
    return rt.app->mode == FERRY_MODE_EVENT ? "event" : "procedural";
}

/* The app's parameter declarations, as HELLO lists them (PROTOCOL.md). */
static void write_params(struct jw *w)
{
    static const char *const type_name[] = {
        [FERRY_PARAM_TYPE_I64] = "int64", [FERRY_PARAM_TYPE_F64] = "float64",
        [FERRY_PARAM_TYPE_BOOL] = "bool", [FERRY_PARAM_TYPE_STR] = "string",
    };
    const struct ferry_param *p;

    jw_arr_begin(w);
    for (p = rt.app->params; p->name != NULL; p++) {
        jw_obj_begin(w);
        jw_key(w, "name");
        jw_str(w, p->name);
        jw_key(w, "type");
        jw_str(w, p->type >= FERRY_PARAM_TYPE_I64 && p->type <= FERRY_PARAM_TYPE_STR
                      ? type_name[p->type] : "invalid");
        jw_key(w, "default");
        if (p->type == FERRY_PARAM_TYPE_I64)
            jw_i64(w, p->dflt.i64);
        else if (p->type == FERRY_PARAM_TYPE_F64)
            jw_f64(w, p->dflt.f64);
        else if (p->type == FERRY_PARAM_TYPE_BOOL)
            jw_bool(w, p->dflt.b);
        else if (p->dflt.str != NULL)
            jw_str(w, p->dflt.str);
        else
            jw_null(w);
        jw_key(w, "doc");
        jw_str(w, p->doc != NULL ? p->doc : "");
        jw_obj_end(w);
    }
    jw_arr_end(w);
}

/* ferry_app.upgrades_from as a list of versions (PROTOCOL.md, HELLO). */
static void write_upgrades_from(struct jw *w)
{
    const char *p = rt.app->upgrades_from;

    jw_arr_begin(w);
    while (*p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);

        while (len > 0 && *p == ' ') {
            p++;
            len--;
        }
        while (len > 0 && p[len - 1] == ' ')
            len--;
        if (len > 0)
            jw_str_n(w, p, len);
        if (end == NULL)
            break;
        p = end + 1;
    }
    jw_arr_end(w);
}

static void send_hello(void)
{
    struct jw w;

    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "protocol");
    jw_i64(&w, 1);
    jw_key(&w, "app");
    jw_str(&w, rt.app->name);
    jw_key(&w, "app_version");
    jw_str(&w, rt.app->version);
    jw_key(&w, "mode");
    jw_str(&w, mode_name());
    jw_key(&w, "platform");
    jw_str(&w, plat_name());
    jw_key(&w, "state");
    jw_str(&w, rt.running ? "running" : "waiting");
    if (rt.app->params != NULL) {
        jw_key(&w, "params");
        write_params(&w);
    }
    if (rt.app->upgrades_from != NULL) {
        jw_key(&w, "upgrades_from");
        write_upgrades_from(&w);
    }
    jw_obj_end(&w);
    rt_send(FRAME_HELLO, &w);
}

static void send_ready(bool restored)
{
    struct jw w;

    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "step");
    if (rt.st.next_step)
        jw_str(&w, rt.st.next_step);
    else
        jw_null(&w);
    jw_key(&w, "restored");
    jw_bool(&w, restored);
    if (restored && rt.st.from_version[0] != '\0') {
        jw_key(&w, "upgraded_from");
        jw_str(&w, rt.st.from_version);
    }
    jw_obj_end(&w);
    rt_send(FRAME_READY, &w);
}

static void bad_body(struct jp *j)
{
    rt_fatal("bad_frame", j->err ? j->err : "malformed frame body",
             RT_EXIT_PROTOCOL);
}

/* Ends the guest unless the guest is (want ? running : waiting). */
static void require_running(bool want, const char *message)
{
    if (rt.running != want)
        rt_fatal("unexpected_frame", message, RT_EXIT_PROTOCOL);
}

/* START {"params": {...}}; other members are ignored. */
static void handle_start(const struct frame *f)
{
    struct jp j;
    struct jstr key;
    bool have_params = false;
    int r;

    require_running(false, "START after START or RESTORE");
    jp_init(&j, f->body, f->len);
    if (!jp_obj_begin(&j))
        bad_body(&j);
    while ((r = jp_obj_next(&j, &key)) == 1) {
        bool ok;
        if (strcmp(key.s, "params") == 0 && !have_params) {
            have_params = true;
            ok = scalars_read(&j, &rt.st.params, false);
        } else {
            ok = jp_skip(&j);
        }
        free(key.s);
        if (!ok)
            bad_body(&j);
    }
    if (r != 0 || !jp_finish(&j))
        bad_body(&j);
    rt.running = true;
    rt.st.next_step = rt.app->mode == FERRY_MODE_EVENT
                          ? CHECKPOINT_EVENT_STEP
                          : checkpoint_find_step(rt.app, rt.app->first_step);
    if (rt.st.next_step == NULL)
        rt_fatal("app_failed", "first_step is not in the step table",
                 RT_EXIT_APP_FAILED);
    if (rt.app->on_start) {
        rt_out_reset();
        rt.app->on_start();
    }
    send_ready(false);
}

/* The app's upgrade hook on a restored older (or newer) version's state;
 * a refusal ends the guest with upgrade_refused and the hook's reason. */
static void run_upgrade(void)
{
    static char why[2 * CHECKPOINT_VERSION_MAX + 512];
    const char *parts[6];
    const char *refusal;
    size_t at = 0;

    rt.in_upgrade = true;
    rt_out_reset();
    refusal = rt.app->upgrade(rt.st.from_version);
    rt.in_upgrade = false;
    rt_out_reset();
    if (refusal == NULL)
        return;
    parts[0] = rt.app->name;
    parts[1] = " ";
    parts[2] = rt.app->version;
    parts[3] = " refuses the state of ";
    parts[4] = rt.st.from_version;
    parts[5] = ": ";
    for (size_t i = 0; i < 7; i++) {
        const char *text = i < 6 ? parts[i] : refusal;
        size_t n = strlen(text);
        if (n > sizeof(why) - 1 - at)
            n = sizeof(why) - 1 - at;
        memcpy(why + at, text, n);
        at += n;
    }
    why[at] = '\0';
    rt_fatal("upgrade_refused", why, RT_EXIT_BAD_DOCUMENT);
}

static void handle_restore(const struct frame *f)
{
    struct checkpoint_state st;
    struct checkpoint_error err;

    require_running(false, "RESTORE after START or RESTORE");
    checkpoint_state_init(&st);
    if (!checkpoint_read(f->body, f->len, rt.app, &st, &err)) {
        checkpoint_state_clear(&st);
        rt_fatal(err.code, err.message, RT_EXIT_BAD_DOCUMENT);
    }
    checkpoint_state_clear(&rt.st);
    rt.st = st;
    if (rt.st.from_version[0] != '\0' && rt.app->upgrade != NULL)
        run_upgrade();
    rt.running = true;
    rt.finished = rt.st.next_step == NULL;
    send_ready(true);
}

static void send_done(const char *source, int64_t seq, bool applied)
{
    struct jw w;

    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "source");
    jw_str(&w, source);
    jw_key(&w, "seq");
    jw_i64(&w, seq);
    jw_key(&w, "applied");
    jw_bool(&w, applied);
    jw_obj_end(&w);
    rt_send(FRAME_DONE, &w);
}

/* INPUT {"source": s, "seq": n, "payload": {...}}; other members ignored. */
static void handle_input(const struct frame *f)
{
    struct jp j;
    struct jstr key, source = {NULL, 0};
    int64_t seq = 0;
    bool have_seq = false, have_payload = false;
    struct kv_value *wm;
    bool created;
    int r;

    require_running(true, "INPUT before START or RESTORE");
    if (rt.app->mode != FERRY_MODE_EVENT)
        rt_fatal("unexpected_frame", "INPUT sent to a procedural app",
                 RT_EXIT_PROTOCOL);
    kv_clear(&rt.input_payload);
    jp_init(&j, f->body, f->len);
    if (!jp_obj_begin(&j))
        bad_body(&j);
    while ((r = jp_obj_next(&j, &key)) == 1) {
        bool ok;
        if (strcmp(key.s, "source") == 0 && source.s == NULL) {
            ok = jp_string(&j, &source) &&
                 (kv_key_valid(source.s, source.n) ||
                  jp_fail(&j, "source must be 1..256 bytes of UTF-8"));
        } else if (strcmp(key.s, "seq") == 0 && !have_seq) {
            have_seq = true;
            ok = jp_int64(&j, &seq) && (seq >= 1 || jp_fail(&j, "seq must be >= 1"));
        } else if (strcmp(key.s, "payload") == 0 && !have_payload) {
            have_payload = true;
            ok = scalars_read(&j, &rt.input_payload, true);
        } else {
            ok = jp_skip(&j);
        }
        free(key.s);
        if (!ok)
            bad_body(&j);
    }
    if (r != 0 || !jp_finish(&j))
        bad_body(&j);
    if (source.s == NULL || !have_seq || !have_payload)
        rt_fatal("bad_frame", "INPUT needs source, seq and payload",
                 RT_EXIT_PROTOCOL);

    wm = kv_find(&rt.st.watermark, source.s);
    if (wm != NULL && seq <= wm->u.i) {
        send_done(source.s, seq, false);
        free(source.s);
        return;
    }
    rt.in_input = true;
    rt.input_source = source.s;
    rt.input_seq = seq;
    rt_out_reset();
    rt.app->on_input();
    rt.in_input = false;
    wm = kv_slot(&rt.st.watermark, source.s, false, &created);
    if (wm == NULL)
        rt_fatal("out_of_memory", "cannot record the watermark",
                 RT_EXIT_NO_MEMORY);
    wm->type = KV_INT64;
    wm->u.i = seq;
    send_done(source.s, seq, true);
    rt.input_source = NULL;
    free(source.s);
    kv_clear(&rt.input_payload);
}

/*
 * CHECKPOINT_REQUEST {"time_ms": n, "pause": bool (optional)}; other members ignored.
 * With pause, a procedural guest runs no further step until RESUME: the host is moving it, and
 * a step run now would be run again by the copy restored elsewhere.
 */
static void handle_checkpoint_request(const struct frame *f)
{
    struct jp j;
    struct jstr key;
    struct jw w;
    int64_t time_ms = -1;
    bool pause = false;
    int r;

    require_running(true, "CHECKPOINT_REQUEST before START or RESTORE");
    jp_init(&j, f->body, f->len);
    if (!jp_obj_begin(&j))
        bad_body(&j);
    while ((r = jp_obj_next(&j, &key)) == 1) {
        bool ok;
        if (strcmp(key.s, "time_ms") == 0 && time_ms < 0)
            ok = jp_int64(&j, &time_ms) &&
                 (time_ms >= 0 || jp_fail(&j, "time_ms must be >= 0"));
        else if (strcmp(key.s, "pause") == 0)
            ok = jp_bool(&j, &pause);
        else
            ok = jp_skip(&j);
        free(key.s);
        if (!ok)
            bad_body(&j);
    }
    if (r != 0 || !jp_finish(&j) || time_ms < 0)
        rt_fatal("bad_frame", "CHECKPOINT_REQUEST needs time_ms",
                 RT_EXIT_PROTOCOL);
    rt.st.created_ms = time_ms;
    jw_init(&w, FRAME_HEADER_LEN);
    checkpoint_write(&w, rt.app, &rt.st);
    if (!w.failed && w.len - FRAME_HEADER_LEN + 1 > FRAME_MAX_LEN) {
        jw_free(&w);
        rt_fatal("state_too_large", "the checkpoint exceeds the frame limit",
                 RT_EXIT_NO_MEMORY);
    }
    rt_send(FRAME_CHECKPOINT, &w);
    rt.paused = pause;
}

/* RESUME {}: steps run again after a pausing checkpoint (the move was called off). */
static void handle_resume(void)
{
    require_running(true, "RESUME before START or RESTORE");
    rt.paused = false;
    send_ready(false);
}

static void handle_stop(void)
{
    struct jw w;

    jw_init(&w, FRAME_HEADER_LEN);
    jw_obj_begin(&w);
    jw_key(&w, "code");
    jw_i64(&w, RT_EXIT_STOPPED);
    jw_key(&w, "reason");
    jw_str(&w, "stop");
    jw_obj_end(&w);
    rt_send(FRAME_EXITED, &w);
    plat_exit(RT_EXIT_STOPPED);
}

static void handle_frame(const struct frame *f)
{
    switch (f->type) {
    case FRAME_START:
        handle_start(f);
        break;
    case FRAME_RESTORE:
        handle_restore(f);
        break;
    case FRAME_INPUT:
        handle_input(f);
        break;
    case FRAME_CHECKPOINT_REQUEST:
        handle_checkpoint_request(f);
        break;
    case FRAME_RESUME:
        handle_resume();
        break;
    case FRAME_STOP:
        handle_stop();
        break;
    default:
        rt_fatal("unexpected_frame", "a guest-to-host frame type was sent to the guest",
                 RT_EXIT_PROTOCOL);
    }
}

/* Reads and handles one frame; on a lost controller, waits for the next. */
static void serve_one_frame(void)
{
    struct frame f;

    switch (frame_read(&f)) {
    case FRAME_OK:
        handle_frame(&f);
        free(f.body);
        return;
    case FRAME_CLOSED:
        if (plat_chan_reconnect() == 0) {
            rt.chan_broken = false;
            rt_console("controller reconnected");
            send_hello();
            return;
        }
        rt_console("channel closed");
        plat_exit(RT_EXIT_CHANNEL_LOST);
    case FRAME_BAD_LENGTH:
        rt_fatal("bad_frame", "frame length out of range", RT_EXIT_PROTOCOL);
    case FRAME_BAD_TYPE:
        rt_fatal("bad_frame", "unknown frame type", RT_EXIT_PROTOCOL);
    case FRAME_NO_MEMORY:
        rt_fatal("out_of_memory", "cannot hold a frame", RT_EXIT_NO_MEMORY);
    }
}

static void run_step(void)
{
    const char *name = rt.st.next_step;
    const char *next;
    ferry_step_fn fn = NULL;
    struct jw w;

    for (const struct ferry_step *s = rt.app->steps; s && s->name; s++) {
        if (s->name == name)
            fn = s->fn;
    }
    if (fn == NULL)
        rt_fatal("app_failed", "no function for the next step", RT_EXIT_APP_FAILED);
    rt_out_reset();
    next = fn();
    if (next == NULL) {
        rt.st.next_step = NULL;
        rt.finished = true;
        jw_init(&w, FRAME_HEADER_LEN);
        jw_obj_begin(&w);
        jw_key(&w, "step");
        jw_str(&w, name);
        jw_obj_end(&w);
        rt_send(FRAME_FINISHED, &w);
        return;
    }
    rt.st.next_step = checkpoint_find_step(rt.app, next);
    if (rt.st.next_step == NULL)
        rt_fatal("app_failed", "a step returned an unknown step name",
                 RT_EXIT_APP_FAILED);
}

/* True when a procedural step is due now. */
static bool step_due(void)
{
    if (!rt.running || rt.app->mode != FERRY_MODE_PROCEDURAL || rt.finished ||
        rt.paused || rt.chan_broken)
        return false;
    if (rt.defer_until_ns != 0) {
        if (plat_chan_wait(rt.defer_until_ns))
            return false;          /* a frame first */
        rt.defer_until_ns = 0;
    }
    return !plat_chan_poll();
}

static bool app_valid(const struct ferry_app *a)
{
    if (a->name == NULL || a->version == NULL || !kv_key_valid(a->name, strlen(a->name)))
        return false;
    if (a->mode == FERRY_MODE_EVENT)
        return a->on_input != NULL;
    if (a->mode == FERRY_MODE_PROCEDURAL)
        return a->steps != NULL && a->first_step != NULL;
    return false;
}

int ferry_runtime_main(const char *cmdline)
{
    (void)cmdline;
    memset(&rt, 0, sizeof(rt));
    rt.app = &ferry_app;
    checkpoint_state_init(&rt.st);
    kv_init(&rt.input_payload);
    if (!app_valid(rt.app))
        rt_fatal("app_failed", "the app definition is incomplete",
                 RT_EXIT_APP_FAILED);
    send_hello();
    for (;;) {
        if (step_due())
            run_step();
        else
            serve_one_frame();
    }
}
