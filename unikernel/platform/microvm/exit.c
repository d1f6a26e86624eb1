/*
 * exit.c: ending the guest.
 *
 * isa-debug-exit (-device isa-debug-exit,iobase=0xf4,iosize=0x04) makes
 * QEMU exit at once with status (code << 1) | 1: always odd, so the host
 * can tell a guest exit from QEMU's own 0 (shutdown) and 1 (error) only
 * for codes >= 1; the host recovers the code as status >> 1. Codes are
 * truncated to 7 bits because an exit status has 8.
 *
 * Without that device the write is ignored and we park the CPU with
 * interrupts off: the host sees a guest that stopped printing and kills
 * it; there is no power-off device we can rely on across VMMs.
 */
#include "platform.h"
#include "microvm.h"
#include "io.h"

#define DEBUG_EXIT_PORT 0xf4

void plat_exit(int code)
{
    outl(DEBUG_EXIT_PORT, (uint32_t)code & 0x7f);
    serial_puts("microvm: no isa-debug-exit device; halting\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

const char *plat_name(void)
{
    return "microvm";
}
