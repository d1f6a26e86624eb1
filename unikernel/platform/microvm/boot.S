/*
 * boot.S: PVH entry, 32-bit protected mode -> 64-bit long mode.
 *
 * QEMU (and Firecracker, cloud-hypervisor) find the 32-bit entry point in
 * the XEN_ELFNOTE_PHYS32_ENTRY note and jump there with paging off, flat
 * 4 GiB segments, interrupts off and %ebx = physical address of the
 * hvm_start_info. Nothing else is promised: no stack, no GDT we may keep,
 * no zeroed .bss. So we:
 *   1. zero .bss (page tables and the stack live there),
 *   2. identity-map 0..4 GiB with 2 MiB pages (the 4th GiB holds the
 *      virtio-mmio windows at 0xfeb00000 and is mapped uncached),
 *   3. enable PAE + EFER.LME + paging, far-jump into a 64-bit code segment,
 *   4. enable SSE/x87 so the core may use double arithmetic,
 *   5. call microvm_start(start_info_paddr) in pvh.c, which never returns.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define CR0_PE   (1 << 0)
#define CR0_MP   (1 << 1)
#define CR0_EM   (1 << 2)
#define CR0_TS   (1 << 3)
#define CR0_NE   (1 << 5)
#define CR0_PG   (1 << 31)
#define CR4_PAE  (1 << 5)
#define CR4_OSFXSR     (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)

#define PTE_P    0x001
#define PTE_RW   0x002
#define PTE_PWT  0x008
#define PTE_PCD  0x010
#define PTE_PS   0x080

#define BOOT_STACK_SIZE (256 * 1024)

/*
 * The note's descriptor is 8 bytes: QEMU reads a size_t after the name,
 * aligned to the PT_NOTE segment's p_align, which the linker script keeps
 * at 4 so the offset QEMU computes matches the one the ELF spec gives.
 */
    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* namesz: "Xen\0" */
    .long 8                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .p2align 2
    .quad _start32

    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    cld
    mov %ebx, %esi                  /* hvm_start_info; rep stos spares %esi */

    xor %eax, %eax
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    rep stosb

    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories of 2 MiB pages. */
    mov $boot_pdpt, %eax
    or $(PTE_P | PTE_RW), %eax
    mov %eax, boot_pml4

    mov $boot_pd, %eax
    or $(PTE_P | PTE_RW), %eax
    xor %ecx, %ecx
1:  mov %eax, boot_pdpt(, %ecx, 8)
    add $4096, %eax
    inc %ecx
    cmp $4, %ecx
    jb 1b

    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $(PTE_P | PTE_RW | PTE_PS), %eax
    cmp $1536, %ecx                 /* 4th GiB: MMIO, APIC, firmware */
    jb 3f
    or $(PTE_PCD | PTE_PWT), %eax
3:  mov %eax, boot_pd(, %ecx, 8)    /* high half stays 0 from the bss clear */
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr

    lgdt boot_gdt_ptr
    mov %cr0, %eax
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $(boot_stack + BOOT_STACK_SIZE), %rsp

    /* SSE: no x87 emulation trap (EM=0), WAIT honours TS (MP=1), native
     * x87 errors (NE=1), FXSAVE and SIMD exceptions enabled in CR4. */
    mov %cr0, %rax
    and $~(CR0_EM | CR0_TS), %rax
    or $(CR0_MP | CR0_NE), %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov %rax, %cr4
    fninit
    ldmxcsr boot_mxcsr

    mov %esi, %edi                  /* zero-extends: 1st argument */
    xor %ebp, %ebp                  /* terminates frame-pointer walks */
    call microvm_start
4:  cli
    hlt
    jmp 4b

    .section .rodata
    .p2align 3
boot_gdt:
    .quad 0                         /* null */
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10: data, DPL 0 */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
boot_mxcsr:
    .long 0x1f80                    /* all SIMD exceptions masked, round to nearest */

    .section .bss
    .p2align 12
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
    .p2align 4
boot_stack: .skip BOOT_STACK_SIZE
    .globl boot_stack
