/*
 * virtio_mmio.c: device discovery and initialisation over virtio-mmio.
 *
 * QEMU's microvm machine has a fixed array of transports at
 * 0xfeb00000 + n * 0x200 (the first -device lands in the highest slot).
 * A slot without a device reads device id 0. Register offsets are from
 * the virtio 1.x spec, section 4.2.2 (modern) and 4.2.4 (legacy).
 */
#include "virtio_mmio.h"
#include "io.h"

#define MMIO_BASE     0xfeb00000u
#define MMIO_STRIDE   0x200u
#define MMIO_SLOTS    32u           /* 24 today; reading a hole is harmless */
#define MMIO_MAGIC    0x74726976u   /* "virt" */

#define REG_MAGIC            0x000
#define REG_VERSION          0x004
#define REG_DEVICE_ID        0x008
#define REG_DEVICE_FEATURES  0x010
#define REG_DEVICE_FEAT_SEL  0x014
#define REG_DRIVER_FEATURES  0x020
#define REG_DRIVER_FEAT_SEL  0x024
#define REG_GUEST_PAGE_SIZE  0x028  /* legacy only */
#define REG_QUEUE_SEL        0x030
#define REG_QUEUE_NUM_MAX    0x034
#define REG_QUEUE_NUM        0x038
#define REG_QUEUE_ALIGN      0x03c  /* legacy only */
#define REG_QUEUE_PFN        0x040  /* legacy only */
#define REG_QUEUE_READY      0x044  /* modern only */
#define REG_QUEUE_NOTIFY     0x050
#define REG_STATUS           0x070
#define REG_QUEUE_DESC_LO    0x080  /* modern only, as are the five below */
#define REG_QUEUE_DESC_HI    0x084
#define REG_QUEUE_AVAIL_LO   0x090
#define REG_QUEUE_AVAIL_HI   0x094
#define REG_QUEUE_USED_LO    0x0a0
#define REG_QUEUE_USED_HI    0x0a4

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER      2u
#define STATUS_DRIVER_OK   4u
#define STATUS_FEATURES_OK 8u
#define STATUS_FAILED      128u

static uint32_t rd(const struct vmmio *d, uint32_t reg) { return mmio_read32(d->base + reg); }
static void wr(const struct vmmio *d, uint32_t reg, uint32_t v) { mmio_write32(d->base + reg, v); }

int vmmio_find(uint32_t device_id, struct vmmio *dev)
{
    for (unsigned n = 0; n < MMIO_SLOTS; n++) {
        struct vmmio d = { MMIO_BASE + n * MMIO_STRIDE, 0, n };
        if (rd(&d, REG_MAGIC) != MMIO_MAGIC)
            continue;
        d.version = rd(&d, REG_VERSION);
        if ((d.version == 1 || d.version == 2) && rd(&d, REG_DEVICE_ID) == device_id) {
            *dev = d;
            return 0;
        }
    }
    return -1;
}

int vmmio_negotiate(struct vmmio *dev, uint64_t wanted, uint64_t *accepted)
{
    wr(dev, REG_STATUS, 0);                         /* reset */
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

    if (dev->version == 2)
        wanted |= VIRTIO_F_VERSION_1;
    uint64_t offered = 0;
    for (uint32_t sel = 0; sel < 2; sel++) {
        wr(dev, REG_DEVICE_FEAT_SEL, sel);
        offered |= (uint64_t)rd(dev, REG_DEVICE_FEATURES) << (32 * sel);
    }
    uint64_t take = offered & wanted;
    for (uint32_t sel = 0; sel < 2; sel++) {
        wr(dev, REG_DRIVER_FEAT_SEL, sel);
        wr(dev, REG_DRIVER_FEATURES, (uint32_t)(take >> (32 * sel)));
    }

    if (dev->version == 2) {
        if (!(take & VIRTIO_F_VERSION_1))
            goto fail;
        wr(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if (!(rd(dev, REG_STATUS) & STATUS_FEATURES_OK))
            goto fail;
    } else {
        wr(dev, REG_GUEST_PAGE_SIZE, VIRTQ_ALIGN);  /* unit of QueuePFN */
    }
    *accepted = take;
    return 0;
fail:
    vmmio_fail(dev);
    return -1;
}

uint16_t vmmio_queue_max(struct vmmio *dev, uint16_t index)
{
    wr(dev, REG_QUEUE_SEL, index);
    uint32_t max = rd(dev, REG_QUEUE_NUM_MAX);
    return max > 0xffff ? 0xffff : (uint16_t)max;
}

void vmmio_queue_enable(struct vmmio *dev, struct virtq *q)
{
    wr(dev, REG_QUEUE_SEL, q->index);
    wr(dev, REG_QUEUE_NUM, q->num);
    if (dev->version == 1) {
        wr(dev, REG_QUEUE_ALIGN, VIRTQ_ALIGN);
        wr(dev, REG_QUEUE_PFN, (uint32_t)((uintptr_t)q->desc / VIRTQ_ALIGN));
    } else {
        uint64_t desc = (uintptr_t)q->desc, avail = (uintptr_t)q->avail, used = (uintptr_t)q->used;
        wr(dev, REG_QUEUE_DESC_LO, (uint32_t)desc);
        wr(dev, REG_QUEUE_DESC_HI, (uint32_t)(desc >> 32));
        wr(dev, REG_QUEUE_AVAIL_LO, (uint32_t)avail);
        wr(dev, REG_QUEUE_AVAIL_HI, (uint32_t)(avail >> 32));
        wr(dev, REG_QUEUE_USED_LO, (uint32_t)used);
        wr(dev, REG_QUEUE_USED_HI, (uint32_t)(used >> 32));
        wr(dev, REG_QUEUE_READY, 1);
    }
}

void vmmio_driver_ok(struct vmmio *dev)
{
    wr(dev, REG_STATUS, rd(dev, REG_STATUS) | STATUS_DRIVER_OK);
}

void vmmio_fail(struct vmmio *dev)
{
    wr(dev, REG_STATUS, rd(dev, REG_STATUS) | STATUS_FAILED);
}

void vmmio_notify(struct vmmio *dev, struct virtq *q)
{
    mb();                           /* avail->idx before the doorbell */
    wr(dev, REG_QUEUE_NOTIFY, q->index);
}
