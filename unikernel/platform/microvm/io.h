/*
 * io.h: x86 port I/O, MMIO and CPU helpers shared by the microvm platform.
 *
 * Everything is static inline so each file that needs a primitive gets it
 * without a call; the asm statements carry "memory" clobbers where the
 * device may observe or change guest memory around them.
 */
#ifndef MICROVM_IO_H
#define MICROVM_IO_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

/* MMIO goes through volatile pointers so the compiler neither merges nor
 * reorders device accesses; x86 keeps stores ordered, so no fences here. */
static inline uint32_t mmio_read32(uintptr_t addr)
{
    return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uintptr_t addr, uint32_t v)
{
    *(volatile uint32_t *)addr = v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

/* Full fence: orders our ring writes before the device reads them (needed
 * for KVM, where the device runs on another host thread). */
static inline void mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

#endif /* MICROVM_IO_H */
