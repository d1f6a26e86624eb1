/* frame.c: see frame.h. */
#include "frame.h"

#include <stdlib.h>

#include "../platform/platform.h"

/* Reads exactly (n) bytes; false if the channel closed or failed first. */
static int read_exact(void *buf, size_t n)
{
    unsigned char *p = buf;

    while (n > 0) {
        long r = plat_chan_read(p, n);
        if (r <= 0)
            return 0;
        p += r;
        n -= (size_t)r;
    }
    return 1;
}

enum frame_status frame_read(struct frame *f)
{
    unsigned char hdr[FRAME_HEADER_LEN];
    uint32_t len;

    f->body = NULL;
    f->len = 0;
    if (!read_exact(hdr, sizeof(hdr)))
        return FRAME_CLOSED;
    len = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 | (uint32_t)hdr[2] << 16 |
          (uint32_t)hdr[3] << 24;
    if (len < 1 || len > FRAME_MAX_LEN)
        return FRAME_BAD_LENGTH;
    f->type = hdr[4];
    if (f->type < FRAME_HELLO || f->type > FRAME_RESUME)
        return FRAME_BAD_TYPE;
    f->len = len - 1;
    f->body = malloc(f->len + 1);
    if (f->body == NULL)
        return FRAME_NO_MEMORY;
    if (!read_exact(f->body, f->len)) {
        free(f->body);
        f->body = NULL;
        return FRAME_CLOSED;
    }
    f->body[f->len] = '\0';
    return FRAME_OK;
}

int frame_send(uint8_t type, struct jw *w)
{
    size_t body;
    uint32_t len;

    if (w->failed || w->len < FRAME_HEADER_LEN)
        return -1;
    body = w->len - FRAME_HEADER_LEN;
    if (body + 1 > FRAME_MAX_LEN)
        return -1;
    len = (uint32_t)(body + 1);
    w->buf[0] = (char)(len & 0xff);
    w->buf[1] = (char)((len >> 8) & 0xff);
    w->buf[2] = (char)((len >> 16) & 0xff);
    w->buf[3] = (char)((len >> 24) & 0xff);
    w->buf[4] = (char)type;
    return plat_chan_write(w->buf, w->len) < 0 ? -1 : 0;
}
