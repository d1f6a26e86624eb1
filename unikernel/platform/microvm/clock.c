/*
 * clock.c: plat_monotonic_ns() from the TSC.
 *
 * Why the TSC: reading it costs no VM exit (KVM) and under TCG QEMU
 * derives it from the host's TSC, so it advances at a constant rate in
 * both. Its rate is unknown to us (TCG exposes no CPUID 0x15/0x16 and no
 * kvmclock), so we calibrate it once at boot against the PIT, whose input
 * clock is fixed at 1.193182 MHz. The PIT is read by latching channel 0,
 * so we need no PC-speaker gate (port 0x61), which microvm may lack.
 *
 * Limits: the rate is measured over CALIBRATION_TICKS (5 ms, paid once
 * at boot); against the host clock it came out within 0.15% under TCG.
 * If the PIT is missing (microvm pit=off) we fall back to an assumed rate
 * and say so on the console.
 * Across a QEMU migration the TSC should continue from where the guest
 * was stopped (QEMU migrates its tick offset), i.e. stay monotonic but not
 * count the paused time; this is not verified yet.
 */
#include "platform.h"
#include "microvm.h"
#include "io.h"

#define PIT_HZ            1193182ull
#define PIT_CH0           0x40
#define PIT_CMD           0x43
#define PIT_CMD_CH0_MODE2 0x34      /* channel 0, lo/hi byte, rate generator */
#define PIT_CMD_CH0_MODE0 0x30      /* channel 0, lo/hi byte, one shot */
#define PIT_CMD_LATCH0    0x00      /* latch channel 0's count */
#define CALIBRATION_TICKS 5966      /* 5 ms of PIT input clock */
#define PIT_PROBE_READS   2000      /* reads without change => no PIT */
#define FALLBACK_TSC_HZ   2000000000ull

static uint64_t tsc_hz;
static uint64_t tsc_boot;
static uint64_t ns_mult;            /* ns per TSC tick, 32.32 fixed point */

static uint16_t pit_read(void)
{
    outb(PIT_CMD, PIT_CMD_LATCH0);
    uint8_t lo = inb(PIT_CH0);
    uint8_t hi = inb(PIT_CH0);
    return (uint16_t)(lo | (hi << 8));
}

/* A PIT count and the TSC at the middle of the read that produced it. */
struct sample {
    uint16_t pit;
    uint64_t tsc;
};

static struct sample sample_now(void)
{
    uint64_t before = rdtsc();
    uint16_t pit = pit_read();
    uint64_t after = rdtsc();
    return (struct sample){ pit, before + (after - before) / 2 };
}

/* Returns the TSC rate in Hz, or 0 if the PIT does not count.
 * Both clocks are read together in sample_now(), and the final sample is
 * taken inside the loop: under TCG the first run of any code path pays
 * for its translation (tens of microseconds), which would otherwise land
 * between the last PIT read and the closing TSC read and skew the rate
 * by 1-2% over a 5 ms window (measured). */
static uint64_t calibrate_with_pit(void)
{
    outb(PIT_CMD, PIT_CMD_CH0_MODE2);
    outb(PIT_CH0, 0xff);             /* reload 65535: a 55 ms period, far */
    outb(PIT_CH0, 0xff);             /* longer than the window we measure */

    struct sample start = sample_now(), now;
    start = sample_now();            /* the first call paid translation */
    uint32_t elapsed;
    for (uint32_t reads = 0;; reads++) {
        now = sample_now();
        elapsed = (uint16_t)(start.pit - now.pit);  /* counts down, wraps */
        if (elapsed >= CALIBRATION_TICKS)
            break;
        if (elapsed == 0 && reads >= PIT_PROBE_READS)
            return 0;
    }
    return (now.tsc - start.tsc) * PIT_HZ / elapsed;
}

void clock_init(void)
{
    tsc_boot = rdtsc();
    tsc_hz = calibrate_with_pit();
    /* Mode 0 (one shot) from now on: a rate generator would keep QEMU's
     * PIT timer firing 18 times a second for nothing (its IRQ is masked). */
    outb(PIT_CMD, PIT_CMD_CH0_MODE0);
    outb(PIT_CH0, 0xff);
    outb(PIT_CH0, 0xff);
    if (tsc_hz == 0) {
        tsc_hz = FALLBACK_TSC_HZ;
        serial_puts("microvm: no PIT, assuming a 2 GHz TSC; clock may be off\n");
    }
    /* 1e9 << 32 < 2^64, and tsc_hz > 1e9/2^32 for any real CPU. */
    ns_mult = (1000000000ull << 32) / tsc_hz;
}

uint64_t clock_tsc_hz(void)
{
    return tsc_hz;
}

unsigned long long plat_monotonic_ns(void)
{
    /* A 128-bit product keeps full precision for centuries of uptime and
     * compiles to one mul (no libgcc division helper). */
    unsigned __int128 t = (unsigned __int128)(rdtsc() - tsc_boot) * ns_mult;
    return (unsigned long long)(t >> 32);
}
