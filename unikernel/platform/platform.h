/*
 * platform.h: what a Ferry target provides to the guest core.
 *
 * The core (unikernel/core/) and the apps (unikernel/apps/) are written
 * against this interface only; every target (unikernel/platform/<target>/)
 * implements it. Nothing here allocates.
 *
 * Entry: the platform's own entry point (main() on unix, the boot code on
 * microvm) sets up the channel and console, then calls
 *
 *     int ferry_runtime_main(const char *cmdline);
 *
 * which the core implements. Its return value is the exit code; the
 * platform passes it to plat_exit(). `cmdline` may be NULL or empty and is
 * reserved for future use (the unix target passes the remaining argv words
 * joined by spaces, microvm the PVH -append string).
 *
 * The C library the core and apps may use, and nothing else (the microvm
 * target provides exactly these; headers <string.h>, <stdlib.h>,
 * <stdint.h>, <stddef.h>, <stdbool.h>):
 *
 *     memcpy memmove memset memcmp strlen strcmp strncmp strchr
 *     malloc calloc realloc free
 *
 * plus plain double arithmetic (+ - * / comparisons, conversions between
 * integer types and double). No printf, no stdio, no math.h, no strtol or
 * strtod: the core formats and parses numbers itself.
 */
#ifndef FERRY_PLATFORM_H
#define FERRY_PLATFORM_H

/*
 * Reads at most (n) bytes from the host channel into (buf). Blocks until at
 * least one byte is available. Returns the number of bytes read (>= 1),
 * 0 if the peer closed the channel, or < 0 on an error.
 */
long plat_chan_read(void *buf, unsigned long n);

/*
 * Writes all (n) bytes of (buf) to the host channel, blocking as needed.
 * Returns n on success or < 0 on an error (the channel is then unusable).
 */
long plat_chan_write(const void *buf, unsigned long n);

/*
 * Returns 1 if a plat_chan_read() would return without blocking (data is
 * available, or the peer closed), else 0. Never blocks.
 */
int plat_chan_poll(void);

/*
 * Returns a monotonic clock in nanoseconds. The origin is unspecified; the
 * value never decreases.
 */
unsigned long long plat_monotonic_ns(void);

/*
 * Writes (n) bytes of (s) to the platform's console (the serial port on
 * microvm, stderr on unix). For humans; best effort; never fails.
 */
void plat_console(const char *s, unsigned long n);

/*
 * Ends the guest with exit code (code). Never returns.
 */
void plat_exit(int code) __attribute__((noreturn));

/*
 * Returns the target's name: "unix" or "microvm". Static storage.
 */
const char *plat_name(void);

/*
 * OPTIONAL functions. The core links weak fallbacks for these
 * (core/plat_defaults.c); a target may define them to do better.
 */

/*
 * Waits until a plat_chan_read() would not block, or until the monotonic
 * clock reaches (deadline_ns), whichever comes first. Returns 1 if the
 * channel is readable, 0 on timeout. The fallback busy-polls
 * plat_chan_poll() and plat_monotonic_ns(); a target that can sleep (poll()
 * on unix, hlt + timer on a VM) should, to keep an idle guest off the CPU.
 */
int plat_chan_wait(unsigned long long deadline_ns);

/*
 * Called by the core after plat_chan_read() returned 0 (the controller went
 * away). Blocks until a new controller is connected and returns 0, or
 * returns < 0 if this target cannot accept another one (the guest then
 * exits). The fallback returns -1. The unix target in --listen mode accepts
 * the next TCP connection; the core then greets it with HELLO.
 */
int plat_chan_reconnect(void);

/* Implemented by the core, called once by the platform's entry point. */
int ferry_runtime_main(const char *cmdline);

#endif /* FERRY_PLATFORM_H */
