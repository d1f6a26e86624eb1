/*
 * microvm.h: interfaces between the files of the microvm platform.
 *
 * Not visible to the core: the core sees only platform.h and the libc
 * headers in include/. Each block below belongs to one source file.
 */
#ifndef MICROVM_H
#define MICROVM_H

#include <stddef.h>
#include <stdint.h>

/* Exit codes the platform itself uses (QEMU reports (code << 1) | 1). */
#define MICROVM_EXIT_TRAP 125   /* a CPU exception (see trap.c) */
#define MICROVM_EXIT_BOOT 124   /* unusable boot information (pvh.c) */

/* serial.c: COM1, polled, never fails. */
void serial_init(void);
void serial_write(const char *s, size_t n);
void serial_puts(const char *s);
void serial_put_hex(uint64_t v);
void serial_put_dec(uint64_t v);

/* trap.c: installs the IDT; every exception is fatal. */
void trap_init(void);

/* irq.c: LAPIC + IOAPIC, used only to wake a halted CPU (see irq.c).
 * irq_init() before clock_init(), irq_calibrate() after it. */
#define IRQ_VEC_DEVICE   0x40
#define IRQ_VEC_TIMER    0x41
#define IRQ_VEC_SPURIOUS 0xff
void irq_init(void);
void irq_calibrate(void);
int irq_ready(void);
void irq_route_virtio(unsigned slot, uintptr_t base);
const char *irq_describe(void);
/* With IF=0: halts until an interrupt, the deadline (plat_monotonic_ns
 * value, 0 = none) or a safety timeout; returns with IF=0. */
void irq_halt(unsigned long long deadline_ns);

/* clock.c: TSC calibrated against the PIT. */
void clock_init(void);
uint64_t clock_tsc_hz(void);

/* alloc.c: the heap covers [lo, hi); called once before any malloc(). */
void alloc_init(uintptr_t lo, uintptr_t hi);
size_t alloc_heap_size(void);

/* virtio_console.c: finds and starts the channel device. Returns 0 on
 * success; on failure the plat_chan_* calls return errors. */
int vcon_init(void);
const char *vcon_describe(void);

/* Linker-script symbols. */
extern char __image_start[], __image_end[];

#endif /* MICROVM_H */
