/*
 * frame.h: the channel framing of unikernel/PROTOCOL.md: a 4-byte
 * little-endian length, a 1-byte type, a JSON body.
 */
#ifndef FERRY_FRAME_H
#define FERRY_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "json_write.h"

/* Largest value of the length field (type byte + body). */
#define FRAME_MAX_LEN (16u * 1024u * 1024u)
#define FRAME_HEADER_LEN 5

enum frame_type {
    FRAME_HELLO = 0x01,
    FRAME_START = 0x02,
    FRAME_RESTORE = 0x03,
    FRAME_READY = 0x04,
    FRAME_INPUT = 0x05,
    FRAME_OUTPUT = 0x06,
    FRAME_DONE = 0x07,
    FRAME_CHECKPOINT_REQUEST = 0x08,
    FRAME_CHECKPOINT = 0x09,
    FRAME_STOP = 0x0A,
    FRAME_LOG = 0x0B,
    FRAME_ERROR = 0x0C,
    FRAME_EXITED = 0x0D,
    FRAME_FINISHED = 0x0E,
    FRAME_RESUME = 0x0F
};

struct frame {
    uint8_t type;
    char *body;      /* malloc'd, NUL-terminated (the NUL is not counted) */
    size_t len;
};

enum frame_status {
    FRAME_OK = 0,
    FRAME_CLOSED,       /* the peer closed (or the channel failed) */
    FRAME_BAD_LENGTH,   /* length 0 or above FRAME_MAX_LEN: stream lost */
    FRAME_BAD_TYPE,     /* a type code this protocol does not know */
    FRAME_NO_MEMORY
};

/* Reads one frame; on FRAME_OK the caller frees f->body. */
enum frame_status frame_read(struct frame *f);

/*
 * Sends (w)'s text as one frame of (type). (w) must have been started with
 * jw_init(w, FRAME_HEADER_LEN). Returns 0, or -1 if the writer failed or
 * the channel write failed.
 */
int frame_send(uint8_t type, struct jw *w);

#endif /* FERRY_FRAME_H */
