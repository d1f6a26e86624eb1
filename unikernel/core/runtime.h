/*
 * runtime.h: the guest's state and the protocol loop, shared by the API
 * implementations (store.c, io.c) and runtime.c.
 */
#ifndef FERRY_RUNTIME_H
#define FERRY_RUNTIME_H

#include <stdbool.h>
#include <stdint.h>

#include "../include/ferry.h"
#include "checkpoint.h"
#include "json_write.h"
#include "kv.h"

/* Exit codes of the guest (EXITED.code and the process/VM exit code). */
enum rt_exit {
    RT_EXIT_STOPPED = 0,       /* STOP */
    RT_EXIT_APP_FAILED = 1,    /* ferry_fail() or a bad step name */
    RT_EXIT_PROTOCOL = 2,      /* bad frame or frame out of place */
    RT_EXIT_BAD_DOCUMENT = 3,  /* RESTORE refused */
    RT_EXIT_NO_MEMORY = 4,
    RT_EXIT_CHANNEL_LOST = 5   /* controller gone, no reconnect possible */
};

struct runtime {
    const struct ferry_app *app;
    bool running;                  /* started or restored */
    struct checkpoint_state st;    /* everything that migrates */
    bool finished;                 /* procedural: the last step returned NULL */
    bool paused;                   /* procedural: no step after a pausing checkpoint until RESUME */
    bool chan_broken;              /* a write failed: drop frames until EOF */

    /* The input being handled (event mode). */
    bool in_input;
    char *input_source;
    int64_t input_seq;
    struct kv input_payload;

    /* The app's upgrade hook is running (no output). */
    bool in_upgrade;

    /* The pending output object. */
    struct jw out;
    bool out_open;

    /* Procedural pacing. */
    unsigned long long defer_until_ns;
};

extern struct runtime rt;

/* Sends one frame built in (w) (jw_init(w, FRAME_HEADER_LEN)) and frees
 * (w). A failed write marks the channel broken; it never ends the guest. */
void rt_send(uint8_t type, struct jw *w);

/* Sends ERROR {code, message} and EXITED {code: exit_code}, then ends the
 * guest. */
void rt_fatal(const char *code, const char *message, int exit_code)
    __attribute__((noreturn));

/* Writes a line to the platform console, prefixed "ferry: ". */
void rt_console(const char *msg);

/* Resets the pending output object to empty. */
void rt_out_reset(void);

#endif /* FERRY_RUNTIME_H */
