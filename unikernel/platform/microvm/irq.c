/*
 * irq.c: interrupts, used for one thing only: waking a halted vCPU.
 *
 * A guest waiting for the host must not spin (under TCG every spinning
 * vCPU is a busy host thread). So the wait loops (virtio_console.c) halt
 * the CPU and two interrupt sources wake it:
 *
 *  - the virtio-mmio device's interrupt line, routed through the IOAPIC
 *    (level-triggered, active high) to IRQ_VEC_DEVICE: new data, a
 *    completed transmit, a control message (host connected/left);
 *  - the LAPIC timer, one-shot, armed to the wait's deadline (at most
 *    IDLE_MAX_NS ahead), to IRQ_VEC_TIMER.
 *
 * The interrupt flag is set ONLY inside irq_halt()'s `sti; hlt`: all other
 * code runs with IF=0, so a handler can never interleave with the
 * platform's state and the handlers (isr.S) touch no state at all: they
 * acknowledge the device (InterruptStatus -> InterruptACK), send the LAPIC
 * EOI and return. The waiting code re-polls the rings after every wake-up.
 * `sti` delays interrupts by one instruction, so an interrupt arriving
 * after the caller's last check (made with IF=0) is taken by the `hlt`
 * instead of being missed.
 *
 * Routing on QEMU's microvm: virtio-mmio slot n raises GSI base + n. With
 * the second IOAPIC (default while ACPI is on, which it is by default:
 * 24 transports) base = 24, i.e. IOAPIC #2 (0xfec10000) pin n; without it
 * base is 16 (ACPI on) or 5 (acpi=off), which the guest cannot tell apart,
 * so both IOAPIC #1 pins are programmed. IDLE_MAX_NS bounds every sleep,
 * so a wrong route costs latency, never a hang.
 *
 * The 8259 PIC (microvm pic=auto creates one, and the LAPIC reset state
 * passes its output through LINT0 as ExtINT) is masked and LINT0 masked,
 * or the PIT's IRQ 0 would arrive as vector 8 (#DF) from an unprogrammed
 * PIC. LAPIC and IOAPIC state is part of QEMU's migration stream, so all
 * of this survives a snapshot/restore.
 */
#include "platform.h"
#include "microvm.h"
#include "io.h"

#define MSR_APIC_BASE     0x1b
#define APIC_BASE_ENABLE  (1u << 11)
#define LAPIC_BASE        0xfee00000u
#define LAPIC_ID          0x020
#define LAPIC_TPR         0x080
#define LAPIC_EOI         0x0b0
#define LAPIC_SVR         0x0f0
#define LAPIC_LVT_TIMER   0x320
#define LAPIC_LVT_LINT0   0x350
#define LAPIC_LVT_ERROR   0x370
#define LAPIC_TIMER_INIT  0x380
#define LAPIC_TIMER_CUR   0x390
#define LAPIC_TIMER_DIV   0x3e0
#define SVR_ENABLE        0x100
#define LVT_MASKED        (1u << 16)
#define TIMER_DIV_1       0xb

#define IOAPIC1_BASE      0xfec00000u
#define IOAPIC2_BASE      0xfec10000u
#define IOAPIC_SEL        0x00
#define IOAPIC_WIN        0x10
#define IOAPIC_REG_VER    0x01
#define IOAPIC_REDIR(pin) (0x10 + 2 * (pin))
#define REDIR_LEVEL       (1u << 15)
#define REDIR_MASKED      (1u << 16)

#define PIC1_DATA         0x21
#define PIC2_DATA         0xa1

#define IDLE_MAX_NS       50000000ull   /* longest sleep: a safety net */
#define FALLBACK_LAPIC_HZ 1000000000ull /* QEMU's and KVM's APIC bus: 1 GHz */

uintptr_t irq_virtio_base;          /* isr.S acknowledges this device */
static int ready;
static uint64_t lapic_hz;
static uint64_t cal_tsc;
static uint32_t cal_count;
static const char *route = "none";

static uint32_t lapic_rd(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_wr(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }

static uint32_t ioapic_rd(uintptr_t base, uint32_t reg)
{
    mmio_write32(base + IOAPIC_SEL, reg);
    return mmio_read32(base + IOAPIC_WIN);
}

static void ioapic_wr(uintptr_t base, uint32_t reg, uint32_t v)
{
    mmio_write32(base + IOAPIC_SEL, reg);
    mmio_write32(base + IOAPIC_WIN, v);
}

/* Number of pins of the IOAPIC at (base), 0 if there is none. */
static unsigned ioapic_pins(uintptr_t base)
{
    uint32_t ver = ioapic_rd(base, IOAPIC_REG_VER);
    if (ver == 0 || ver == 0xffffffffu)
        return 0;
    return ((ver >> 16) & 0xff) + 1;
}

static void ioapic_route(uintptr_t base, unsigned pin, uint8_t vector)
{
    if (pin >= ioapic_pins(base))
        return;
    uint32_t apic_id = lapic_rd(LAPIC_ID) >> 24;
    ioapic_wr(base, IOAPIC_REDIR(pin), REDIR_MASKED);   /* while we edit it */
    ioapic_wr(base, IOAPIC_REDIR(pin) + 1, apic_id << 24);
    ioapic_wr(base, IOAPIC_REDIR(pin), REDIR_LEVEL | vector);  /* fixed, physical, active high */
}

/* Before clock_init(): enables the LAPIC and starts its timer counting
 * down (masked), so irq_calibrate() can measure its rate over the same
 * window the PIT calibration of the TSC takes anyway (no extra boot time). */
void irq_init(void)
{
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);

    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(MSR_APIC_BASE));
    if ((lo & 0xfffff000u) != LAPIC_BASE || hi != 0)
        return;                     /* moved or x2APIC-only: stay polled */
    if (!(lo & APIC_BASE_ENABLE)) {
        lo |= APIC_BASE_ENABLE;
        __asm__ volatile("wrmsr" : : "a"(lo), "d"(hi), "c"(MSR_APIC_BASE));
    }
    lapic_wr(LAPIC_SVR, SVR_ENABLE | IRQ_VEC_SPURIOUS);
    lapic_wr(LAPIC_TPR, 0);
    lapic_wr(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_wr(LAPIC_LVT_ERROR, LVT_MASKED);
    lapic_wr(LAPIC_LVT_TIMER, LVT_MASKED | IRQ_VEC_TIMER);
    lapic_wr(LAPIC_TIMER_DIV, TIMER_DIV_1);
    lapic_wr(LAPIC_TIMER_INIT, 0xffffffffu);
    cal_tsc = rdtsc();
    cal_count = lapic_rd(LAPIC_TIMER_CUR);
    ready = 1;
}

/* After clock_init(): the LAPIC timer's rate against the calibrated TSC. */
void irq_calibrate(void)
{
    if (!ready)
        return;
    uint32_t count = lapic_rd(LAPIC_TIMER_CUR);
    uint64_t tsc = rdtsc();
    lapic_wr(LAPIC_TIMER_INIT, 0);  /* stop it */
    uint64_t ticks = cal_count - count, dt = tsc - cal_tsc;
    lapic_hz = dt ? (uint64_t)((unsigned __int128)ticks * clock_tsc_hz() / dt) : 0;
    if (lapic_hz < 1000000 || count == 0) {
        lapic_hz = FALLBACK_LAPIC_HZ;
        serial_puts("microvm: LAPIC timer did not count as expected, assuming 1 GHz\n");
    }
}

/* Routes virtio-mmio slot (slot), whose registers are at (base), to
 * IRQ_VEC_DEVICE. */
void irq_route_virtio(unsigned slot, uintptr_t base)
{
    if (!ready)
        return;
    irq_virtio_base = base;
    if (ioapic_pins(IOAPIC2_BASE) > slot) {
        ioapic_route(IOAPIC2_BASE, slot, IRQ_VEC_DEVICE);
        route = "ioapic2";
    } else {
        ioapic_route(IOAPIC1_BASE, 16 + slot, IRQ_VEC_DEVICE);
        ioapic_route(IOAPIC1_BASE, 5 + slot, IRQ_VEC_DEVICE);
        route = "ioapic1";
    }
}

const char *irq_describe(void)
{
    return route;
}

int irq_ready(void)
{
    return ready;
}

/* Called with IF=0 after the caller found nothing to do. Sleeps until an
 * interrupt, or until plat_monotonic_ns() reaches (deadline_ns) (0: none)
 * but never longer than IDLE_MAX_NS. Returns with IF=0. */
void irq_halt(unsigned long long deadline_ns)
{
    if (!ready) {
        cpu_relax();
        return;
    }
    unsigned long long now = plat_monotonic_ns();
    unsigned long long wait = IDLE_MAX_NS;
    if (deadline_ns != 0) {
        if (deadline_ns <= now)
            return;
        if (deadline_ns - now < wait)
            wait = deadline_ns - now;
    }
    uint64_t count = (uint64_t)((unsigned __int128)wait * lapic_hz / 1000000000u) + 1;
    if (count > 0xffffffffu)
        count = 0xffffffffu;
    lapic_wr(LAPIC_LVT_TIMER, IRQ_VEC_TIMER);   /* one-shot, unmasked */
    lapic_wr(LAPIC_TIMER_INIT, (uint32_t)count);
    __asm__ volatile("sti; hlt; cli" : : : "memory");
}
