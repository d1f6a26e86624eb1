/*
 * isr.S: entry stubs for the 32 CPU exception vectors.
 *
 * Each stub makes the stack look the same (an error code, real or 0, then
 * the vector), saves the general registers and hands a pointer to that
 * frame to trap_handler() in trap.c, which reports and exits. Nothing ever
 * returns here, so there is no iretq path.
 */
    .text

.macro ISR_NOERR vec
isr_\vec:
    push $0
    push $\vec
    jmp isr_common
.endm

.macro ISR_ERR vec
isr_\vec:
    push $\vec
    jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    and $-16, %rsp                  /* ABI alignment for the C handler */
    call trap_handler
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .p2align 3
    .globl isr_table
isr_table:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\vec
.endr

/*
 * Interrupt stubs (see irq.c). Interrupts are only ever enabled across the
 * `sti; hlt` of irq_halt(), so these interrupt nothing but a halted CPU;
 * they still save what they use and return with iretq. No C, no SSE.
 */
#define LAPIC_EOI_ADDR      0xfee000b0
#define VIRTIO_MMIO_INT_STATUS 0x60
#define VIRTIO_MMIO_INT_ACK    0x64

    .text
    .globl irq_device_entry, irq_timer_entry, irq_spurious_entry
/* The virtio-mmio device: acknowledge every pending cause, so the level-
 * triggered line drops before the EOI (else it fires again at once). */
irq_device_entry:
    push %rax
    push %rcx
    mov irq_virtio_base, %rax
    test %rax, %rax
    jz 1f
    mov VIRTIO_MMIO_INT_STATUS(%rax), %ecx
    mov %ecx, VIRTIO_MMIO_INT_ACK(%rax)
1:  mov $LAPIC_EOI_ADDR, %eax
    movl $0, (%rax)
    pop %rcx
    pop %rax
    iretq

irq_timer_entry:
    push %rax
    mov $LAPIC_EOI_ADDR, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/* The LAPIC's spurious vector: no EOI by definition. */
irq_spurious_entry:
    iretq
