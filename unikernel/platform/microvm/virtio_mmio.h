/*
 * virtio_mmio.h: the virtio-mmio transport, legacy (version 1, QEMU's
 * default) and modern (version 2, -global virtio-mmio.force-legacy=false).
 */
#ifndef MICROVM_VIRTIO_MMIO_H
#define MICROVM_VIRTIO_MMIO_H

#include <stdint.h>
#include "virtqueue.h"

#define VIRTIO_F_VERSION_1 (1ull << 32)

struct vmmio {
    uintptr_t base;                 /* register window */
    uint32_t version;               /* 1 = legacy, 2 = modern */
    unsigned slot;                  /* index of the window on microvm */
};

/* Finds the first transport holding a device of type (device_id). Returns 0
 * and fills (*dev), or -1 if there is none. */
int vmmio_find(uint32_t device_id, struct vmmio *dev);

/* Resets the device and negotiates features: accepts (wanted) & offered
 * (plus VIRTIO_F_VERSION_1 on a modern device, which requires it). Returns
 * 0 and the accepted set in (*accepted), or -1 if the device refused. */
int vmmio_negotiate(struct vmmio *dev, uint64_t wanted, uint64_t *accepted);

/* Returns the largest size the device allows for queue (index), 0 if the
 * queue does not exist. */
uint16_t vmmio_queue_max(struct vmmio *dev, uint16_t index);

/* Tells the device where queue (q) lives; q must be virtq_init()ed. */
void vmmio_queue_enable(struct vmmio *dev, struct virtq *q);

/* Sets DRIVER_OK: the device may now use the enabled queues. */
void vmmio_driver_ok(struct vmmio *dev);

/* Gives up on the device (sets FAILED). */
void vmmio_fail(struct vmmio *dev);

/* Tells the device that queue (q) has new available buffers. */
void vmmio_notify(struct vmmio *dev, struct virtq *q);

#endif /* MICROVM_VIRTIO_MMIO_H */
