/*
 * pvh.c: from the PVH boot information to ferry_runtime_main().
 *
 * boot.S calls microvm_start() in long mode with the physical address of
 * the hvm_start_info (Xen's PVH ABI, xen/include/public/arch-x86/
 * hvm/start_info.h; QEMU fills version 1 with an E820-style memory map).
 * Order matters: the console first (so every later failure is visible),
 * then the IDT, then what we must copy out of boot memory before the heap
 * may reuse it (the command line), then heap, LAPIC (irq.c; its timer is
 * calibrated over the clock's calibration window), clock and channel.
 */
#include <string.h>

#include "platform.h"
#include "microvm.h"
#include "io.h"

#define HVM_START_MAGIC 0x336ec578u
#define E820_RAM        1u
#define MAPPED_LIMIT    0x100000000ull  /* boot.S maps the first 4 GiB */
#define FALLBACK_RAM_END 0x2000000ull   /* 32 MiB: QEMU's microvm minimum-ish */
#define CMDLINE_MAX     4096

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;          /* version >= 1 */
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

static char cmdline[CMDLINE_MAX];

void microvm_start(uint32_t start_info_paddr) __attribute__((noreturn));

static void copy_cmdline(const struct hvm_start_info *si)
{
    if (si->cmdline_paddr == 0 || si->cmdline_paddr >= MAPPED_LIMIT)
        return;
    const char *src = (const char *)(uintptr_t)si->cmdline_paddr;
    size_t n = 0;
    while (n < CMDLINE_MAX - 1 && src[n])
        n++;
    if (src[n])
        serial_puts("microvm: command line truncated to 4095 bytes\n");
    memcpy(cmdline, src, n);
    cmdline[n] = 0;
}

/* The heap is the largest RAM range above the image, clipped to the mapped
 * 4 GiB. Low memory (< 1 MiB) holds firmware leftovers and is ignored. The
 * start_info and memory map live below 1 MiB on QEMU, so the heap never
 * overlaps them; we are done reading them before the first malloc anyway. */
static void find_heap(const struct hvm_start_info *si, uintptr_t *lo, uintptr_t *hi)
{
    uint64_t image_end = ((uintptr_t)__image_end + 4095) & ~4095ull;
    uint64_t best_lo = 0, best_hi = 0;

    if (si->version >= 1 && si->memmap_paddr != 0 && si->memmap_paddr < MAPPED_LIMIT) {
        const struct hvm_memmap_entry *e = (const void *)(uintptr_t)si->memmap_paddr;
        for (uint32_t i = 0; i < si->memmap_entries; i++) {
            if (e[i].type != E820_RAM)
                continue;
            uint64_t a = e[i].addr, b = e[i].addr + e[i].size;
            if (a < image_end)
                a = image_end;
            if (b > MAPPED_LIMIT)
                b = MAPPED_LIMIT;
            if (b > a && b - a > best_hi - best_lo) {
                best_lo = a;
                best_hi = b;
            }
        }
    }
    if (best_hi == 0) {
        serial_puts("microvm: no memory map; assuming 32 MiB of RAM\n");
        best_lo = image_end;
        best_hi = FALLBACK_RAM_END;
    }
    *lo = (uintptr_t)best_lo;
    *hi = (uintptr_t)best_hi;
}

void microvm_start(uint32_t start_info_paddr)
{
    uint64_t tsc_entry = rdtsc();
    serial_init();
    serial_puts("microvm: booting\n");   /* first sign of life for the host */
    trap_init();

    const struct hvm_start_info *si = (const void *)(uintptr_t)start_info_paddr;
    if (si == NULL || si->magic != HVM_START_MAGIC) {
        serial_puts("microvm: no PVH start info (bad magic); not a PVH boot?\n");
        plat_exit(MICROVM_EXIT_BOOT);
    }
    copy_cmdline(si);

    uintptr_t heap_lo, heap_hi;
    find_heap(si, &heap_lo, &heap_hi);
    alloc_init(heap_lo, heap_hi);

    irq_init();
    clock_init();
    irq_calibrate();
    int chan = vcon_init();
    uint64_t boot_us = (rdtsc() - tsc_entry) * 1000000ull / clock_tsc_hz();

    serial_puts("microvm: heap ");
    serial_put_dec(alloc_heap_size() >> 20);
    serial_puts(" MiB, tsc ");
    serial_put_dec(clock_tsc_hz() / 1000000);
    serial_puts(" MHz, channel ");
    serial_puts(chan == 0 ? vcon_describe() : "MISSING (no virtio console)");
    serial_puts(", irq ");
    serial_puts(irq_describe());
    serial_puts(", platform init ");
    serial_put_dec(boot_us);
    serial_puts(" us\n");

    plat_exit(ferry_runtime_main(cmdline));
}
