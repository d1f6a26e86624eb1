/*
 * serial.c: COM1 (16550 at 0x3f8), the microvm log console.
 *
 * Polled output only: the console is for humans and post-mortems, so it
 * must work before anything else is set up and from the trap handler.
 * Bytes are written verbatim (no \n -> \r\n) so host logs stay clean.
 */
#include "platform.h"
#include "microvm.h"
#include "io.h"

#define COM1      0x3f8
#define UART_THR  0         /* transmit holding register (DLAB=0) */
#define UART_DLL  0         /* divisor latch low (DLAB=1) */
#define UART_IER  1
#define UART_DLM  1         /* divisor latch high (DLAB=1) */
#define UART_FCR  2
#define UART_LCR  3
#define UART_MCR  4
#define UART_LSR  5
#define LSR_THRE  0x20      /* THR empty: room for one more byte */

/* A bounded wait: a missing UART reads 0xff (THRE set) so we never spin
 * there, and a wedged one must not hang the guest. */
#define THRE_SPINS 100000

void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);    /* no interrupts: we poll */
    outb(COM1 + UART_LCR, 0x80);    /* DLAB=1 */
    outb(COM1 + UART_DLL, 0x01);    /* 115200 baud; QEMU ignores it */
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, 0x03);    /* 8N1, DLAB=0 */
    outb(COM1 + UART_FCR, 0x07);    /* enable + clear FIFOs */
    outb(COM1 + UART_MCR, 0x03);    /* DTR, RTS */
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (int spin = 0; spin < THRE_SPINS; spin++) {
            if (inb(COM1 + UART_LSR) & LSR_THRE)
                break;
            cpu_relax();
        }
        outb(COM1 + UART_THR, (uint8_t)s[i]);
    }
}

void serial_puts(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    serial_write(s, n);
}

void serial_put_hex(uint64_t v)
{
    char buf[18];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 0xf];
    serial_write(buf, sizeof(buf));
}

void serial_put_dec(uint64_t v)
{
    char buf[20];
    int i = sizeof(buf);
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    serial_write(buf + i, sizeof(buf) - (size_t)i);
}

void plat_console(const char *s, unsigned long n)
{
    serial_write(s, n);
}
