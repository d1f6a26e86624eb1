/*
 * virtqueue.h: split virtqueues (virtio 1.x section 2.6, identical in the
 * legacy interface), driven by polling.
 *
 * The driver owns all descriptors: it fills desc[i] itself and posts the
 * head i; the device hands heads back through the used ring. The memory
 * for a queue is laid out as legacy virtio-mmio demands (descriptors,
 * available ring, then the used ring at the next VIRTQ_ALIGN boundary),
 * which also satisfies the modern interface's alignment rules.
 * Interrupts are suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT) except while the
 * driver is about to halt waiting for the queue.
 */
#ifndef MICROVM_VIRTQUEUE_H
#define MICROVM_VIRTQUEUE_H

#include <stddef.h>
#include <stdint.h>

#define VIRTQ_ALIGN        4096u
#define VIRTQ_MAX_SIZE     128u     /* what we allocate memory for */
#define VIRTQ_MEM_SIZE     (2 * VIRTQ_ALIGN)  /* enough for VIRTQ_MAX_SIZE */

#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2        /* device writes the buffer */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];
};

struct virtq {
    uint16_t index;                 /* queue number on the device */
    uint16_t num;                   /* entries; a power of two */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t avail_idx;             /* our copy of avail->idx */
    uint16_t used_seen;             /* used->idx we have consumed up to */
};

/* Lays out queue (index) with (num) entries in (mem), VIRTQ_MEM_SIZE bytes
 * aligned to VIRTQ_ALIGN, which must be zeroed. */
void virtq_init(struct virtq *q, uint16_t index, uint16_t num, void *mem);

/* Posts descriptor chain head (id) to the device; the caller notifies. */
void virtq_post(struct virtq *q, uint16_t id);

/* Takes the next completed head: returns 1 and sets (*id, *len), or 0 if
 * the device has completed nothing new. Never blocks. */
int virtq_take_used(struct virtq *q, uint16_t *id, uint32_t *len);

/* Returns 1 if virtq_take_used() would succeed. */
int virtq_has_used(const struct virtq *q);

/* Asks the device to interrupt (or not) when it adds used buffers. A queue
 * starts with interrupts suppressed; a waiter enables them, re-checks
 * virtq_has_used() (a fence is in between) and only then halts. */
void virtq_intr(struct virtq *q, int on);

#endif /* MICROVM_VIRTQUEUE_H */
