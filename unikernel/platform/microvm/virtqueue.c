/*
 * virtqueue.c: the split-ring bookkeeping shared by every virtio driver.
 * See virtqueue.h for the ownership rules.
 */
#include "virtqueue.h"
#include "io.h"

void virtq_init(struct virtq *q, uint16_t index, uint16_t num, void *mem)
{
    uintptr_t base = (uintptr_t)mem;
    uintptr_t avail = base + 16u * num;
    uintptr_t used = (avail + 4u + 2u * num + 2u + VIRTQ_ALIGN - 1) & ~(uintptr_t)(VIRTQ_ALIGN - 1);

    q->index = index;
    q->num = num;
    q->desc = (volatile struct virtq_desc *)base;
    q->avail = (volatile struct virtq_avail *)avail;
    q->used = (volatile struct virtq_used *)used;
    q->avail_idx = 0;
    q->used_seen = 0;
    /* Busy, we poll: interrupts only while halted (virtq_intr). */
    q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
}

void virtq_intr(struct virtq *q, int on)
{
    q->avail->flags = on ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
    /* The flag must be visible before we re-read used->idx (the device
     * writes used->idx, then reads the flag). */
    mb();
}

void virtq_post(struct virtq *q, uint16_t id)
{
    q->avail->ring[q->avail_idx & (q->num - 1)] = id;
    q->avail_idx++;
    /* The ring entry (and the descriptor) must be visible before the index
     * that publishes them. */
    mb();
    q->avail->idx = q->avail_idx;
}

int virtq_has_used(const struct virtq *q)
{
    return q->used->idx != q->used_seen;
}

int virtq_take_used(struct virtq *q, uint16_t *id, uint32_t *len)
{
    if (!virtq_has_used(q))
        return 0;
    /* Read the element only after seeing the index that published it. */
    mb();
    volatile struct virtq_used_elem *e = &q->used->ring[q->used_seen & (q->num - 1)];
    *id = (uint16_t)e->id;
    *len = e->len;
    q->used_seen++;
    return 1;
}
