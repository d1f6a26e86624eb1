/*
 * trap.c: the exception IDT. Every CPU exception is fatal: it is reported
 * on the serial console (vector, name, error code, rip, rsp, cr2) and the
 * guest exits with MICROVM_EXIT_TRAP, so a crash is never a silent hang.
 *
 * The 32 exception vectors are installed, plus the three interrupt vectors
 * of irq.c (device, LAPIC timer, LAPIC spurious), whose stubs in isr.S
 * acknowledge and return. Any other vector would be a bug: its gate is not
 * present, which raises #NP (reported here like any exception).
 * There is no TSS/IST: an exception whose frame cannot be pushed becomes
 * a triple fault, which QEMU's -no-reboot turns into a (silent) exit.
 */
#include "platform.h"
#include "microvm.h"

struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;      /* pushed by the CPU */
};

struct idt_entry {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t reserved;
} __attribute__((packed));

#define IDT_VECTORS   32                    /* CPU exceptions */
#define IDT_SIZE      256
#define KERNEL_CS     0x08                  /* boot.S GDT */
#define GATE_INTERRUPT 0x8e                 /* present, DPL 0, 64-bit interrupt gate */

extern const uint64_t isr_table[IDT_VECTORS];
extern const char irq_device_entry[], irq_timer_entry[], irq_spurious_entry[];
static struct idt_entry idt[IDT_SIZE] __attribute__((aligned(16)));

static const char *const trap_names[IDT_VECTORS] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint",
    "#OF overflow", "#BR bound range", "#UD invalid opcode", "#NM no FPU",
    "#DF double fault", "coprocessor overrun", "#TS invalid TSS",
    "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
    "#MC machine check", "#XM SIMD error", "#VE virtualization", "#CP control protection",
    "reserved", "reserved", "reserved", "reserved", "reserved", "reserved",
    "#HV hypervisor injection", "#VC VMM communication", "#SX security", "reserved",
};

static void set_gate(unsigned v, uint64_t a)
{
    idt[v].offset_lo = (uint16_t)a;
    idt[v].selector = KERNEL_CS;
    idt[v].ist = 0;
    idt[v].type_attr = GATE_INTERRUPT;      /* clears IF while a handler runs */
    idt[v].offset_mid = (uint16_t)(a >> 16);
    idt[v].offset_hi = (uint32_t)(a >> 32);
    idt[v].reserved = 0;
}

void trap_init(void)
{
    for (unsigned v = 0; v < IDT_VECTORS; v++)
        set_gate(v, isr_table[v]);
    set_gate(IRQ_VEC_DEVICE, (uintptr_t)irq_device_entry);
    set_gate(IRQ_VEC_TIMER, (uintptr_t)irq_timer_entry);
    set_gate(IRQ_VEC_SPURIOUS, (uintptr_t)irq_spurious_entry);
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

void trap_handler(struct trap_frame *f) __attribute__((noreturn));

void trap_handler(struct trap_frame *f)
{
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));

    serial_puts("\nmicrovm: fatal exception ");
    serial_put_dec(f->vector);
    serial_puts(" (");
    serial_puts(f->vector < IDT_VECTORS ? trap_names[f->vector] : "?");
    serial_puts(") error=");
    serial_put_hex(f->error);
    serial_puts(" rip=");
    serial_put_hex(f->rip);
    serial_puts(" rsp=");
    serial_put_hex(f->rsp);
    serial_puts(" cr2=");
    serial_put_hex(cr2);
    serial_puts("\n");
    plat_exit(MICROVM_EXIT_TRAP);
}
