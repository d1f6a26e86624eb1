/*
 * smoke_main.c: a stand-in for the core, to test the microvm platform
 * alone. Uses only platform.h and the libc subset, as the core must.
 *
 * First runs self-checks (clock, allocator, doubles; skipped with
 * checks=0) and reports them on the serial console, then does what the
 * command line (-append) asks:
 *   mode=selftest code=C   exit with C
 *   mode=echo bytes=N code=C
 *                          write "READY\n" on the channel, echo N bytes back
 *                          (read -> write), write "BYE\n", exit with C
 *   mode=close sessions=S code=C
 *                          like echo, until the host disconnects (read
 *                          returns 0); then plat_chan_reconnect() and do it
 *                          again, S sessions in all (default 1); exit with C
 *   mode=wait ms=M rounds=R code=C
 *                          write "READY\n", then R times: plat_chan_wait()
 *                          with a deadline M ms ahead; if data came, read
 *                          it (up to 64 KiB); write "WAIT r=<0|1> us=<time
 *                          waited> n=<bytes read>\n"; exit with C
 *   mode=crash             dereference unmapped memory (tests trap.c)
 * Any failed check exits with code 3. Needs about 48 MiB of heap (-m 64M).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "platform.h"

static void say(const char *s) { plat_console(s, strlen(s)); }

static void say_num(unsigned long long v)
{
    char buf[24];
    int i = sizeof(buf);
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    plat_console(buf + i, sizeof(buf) - (unsigned long)i);
}

static void fail(const char *what)
{
    say("smoke: FAIL ");
    say(what);
    say("\n");
    plat_exit(3);
}

/* Value of "key=" in the command line, or (dflt). */
static unsigned long long arg_num(const char *cmdline, const char *key, unsigned long long dflt)
{
    size_t k = strlen(key);
    for (const char *p = cmdline; p && *p; p++) {
        if ((p == cmdline || p[-1] == ' ') && strncmp(p, key, k) == 0 && p[k] == '=') {
            unsigned long long v = 0;
            for (p += k + 1; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (unsigned long long)(*p - '0');
            return v;
        }
    }
    return dflt;
}

static int arg_is(const char *cmdline, const char *key, const char *value)
{
    size_t k = strlen(key), v = strlen(value);
    for (const char *p = cmdline; p && *p; p++) {
        if ((p == cmdline || p[-1] == ' ') && strncmp(p, key, k) == 0 && p[k] == '=' &&
            strncmp(p + k + 1, value, v) == 0 && (p[k + 1 + v] == ' ' || p[k + 1 + v] == 0))
            return 1;
    }
    return 0;
}

static void check_clock(void)
{
    unsigned long long t0 = plat_monotonic_ns();
    volatile unsigned long spin = 0;
    for (unsigned long i = 0; i < 1000000; i++)
        spin += i;
    unsigned long long t1 = plat_monotonic_ns();
    if (t1 < t0)
        fail("clock went backwards");
    say("smoke: clock ok, 1e6-iteration loop took ");
    say_num((t1 - t0) / 1000);
    say(" us\n");
}

/* Growth patterns of the core: a doubling buffer, a list of many small
 * nodes, interleaved frees; contents must survive every move. */
static void check_alloc(void)
{
    unsigned char *buf = NULL;
    size_t cap = 0;
    for (size_t len = 16; len <= 8u << 20; len *= 2) {
        unsigned char *nb = realloc(buf, len);
        if (!nb)
            fail("realloc growth");
        for (size_t i = 0; i < cap; i++)
            if (nb[i] != (unsigned char)(i * 7))
                fail("realloc lost data");
        for (size_t i = cap; i < len; i++)
            nb[i] = (unsigned char)(i * 7);
        buf = nb;
        cap = len;
    }

    void *nodes[4096];
    for (int i = 0; i < 4096; i++) {
        nodes[i] = malloc((size_t)(i % 200) + 1);
        if (!nodes[i] || ((uintptr_t)nodes[i] & 15))
            fail("small malloc");
        memset(nodes[i], i & 0xff, (size_t)(i % 200) + 1);
    }
    for (int i = 0; i < 4096; i += 2)
        free(nodes[i]);
    unsigned char *big = calloc(3u << 20, 1);
    if (!big || big[0] != 0 || big[(3u << 20) - 1] != 0)
        fail("calloc");
    for (int i = 1; i < 4096; i += 2)
        if (((unsigned char *)nodes[i])[0] != (unsigned char)(i & 0xff))
            fail("small block corrupted");
    for (int i = 1; i < 4096; i += 2)
        free(nodes[i]);
    free(big);
    buf = realloc(buf, 100);                /* shrink in place */
    if (!buf || buf[99] != (unsigned char)(99 * 7))
        fail("realloc shrink");
    free(buf);

    /* Everything was freed and coalesced: one huge block must fit again. */
    void *huge = malloc(40u << 20);
    if (!huge)
        fail("heap did not coalesce");
    free(huge);
    say("smoke: alloc ok (8 MiB doubling, 4096 small, 40 MiB after frees)\n");
}

static void check_double(void)
{
    volatile double n = 200000;             /* volatile: compute at run time */
    double sum = 0;
    for (double k = 1; k <= n; k += 1)
        sum += 1.0 / (k * k);
    double pi2 = sum * 6.0;                 /* -> pi^2 = 9.8696044... */
    if (pi2 < 9.8695 || pi2 > 9.8697)
        fail("double arithmetic");
    say("smoke: double ok, pi^2 ~ ");
    say_num((unsigned long long)(pi2 * 1e6));
    say("e-6\n");
}

static void chan_write_all(const void *p, unsigned long n)
{
    if (plat_chan_write(p, n) != (long)n)
        fail("plat_chan_write");
}

static int echo(unsigned long long limit, int until_close)
{
    static char buf[65536];
    unsigned long long done = 0;
    while (until_close || done < limit) {
        unsigned long want = sizeof(buf);
        if (!until_close && limit - done < want)
            want = (unsigned long)(limit - done);
        long got = plat_chan_read(buf, want);
        if (got == 0)
            return until_close ? 0 : -1;
        if (got < 0)
            fail("plat_chan_read");
        chan_write_all(buf, (unsigned long)got);
        done += (unsigned long long)got;
    }
    return 0;
}

static char *put_num(char *p, unsigned long long v)
{
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        *p++ = tmp[--i];
    return p;
}

static void wait_rounds(unsigned long long ms, unsigned long long rounds)
{
    static char buf[65536];
    chan_write_all("READY\n", 6);
    for (unsigned long long i = 0; i < rounds; i++) {
        unsigned long long t0 = plat_monotonic_ns();
        int r = plat_chan_wait(t0 + ms * 1000000ull);
        unsigned long long us = (plat_monotonic_ns() - t0) / 1000;
        long n = 0;
        if (r && (n = plat_chan_read(buf, sizeof(buf))) <= 0)
            fail("plat_chan_read after plat_chan_wait");
        char line[80], *p = line;
        memcpy(p, "WAIT r=", 7);
        p = put_num(p + 7, (unsigned long long)r);
        memcpy(p, " us=", 4);
        p = put_num(p + 4, us);
        memcpy(p, " n=", 3);
        p = put_num(p + 3, (unsigned long long)n);
        *p++ = '\n';
        chan_write_all(line, (unsigned long)(p - line));
    }
}

int ferry_runtime_main(const char *cmdline)
{
    say("smoke: hello from ");
    say(plat_name());
    say(", cmdline '");
    say(cmdline ? cmdline : "");
    say("'\n");
    if (arg_num(cmdline, "checks", 1)) {
        check_clock();
        check_alloc();
        check_double();
    }

    int code = (int)arg_num(cmdline, "code", 0);
    if (arg_is(cmdline, "mode", "crash")) {
        say("smoke: crashing on purpose\n");
        return *(volatile int *)0x4000000000ull;
    }
    if (arg_is(cmdline, "mode", "echo")) {
        unsigned long long t0 = plat_monotonic_ns();
        chan_write_all("READY\n", 6);
        unsigned long long bytes = arg_num(cmdline, "bytes", 0);
        if (echo(bytes, 0) != 0)
            fail("host closed the channel early");
        chan_write_all("BYE\n", 4);
        say("smoke: echo done, ");
        say_num(bytes);
        say(" bytes in ");
        say_num((plat_monotonic_ns() - t0) / 1000);
        say(" us (guest clock, including the wait for the host)\n");
    }
    if (arg_is(cmdline, "mode", "wait"))
        wait_rounds(arg_num(cmdline, "ms", 1000), arg_num(cmdline, "rounds", 1));
    if (arg_is(cmdline, "mode", "close")) {
        unsigned long long sessions = arg_num(cmdline, "sessions", 1);
        for (unsigned long long i = 1;; i++) {
            chan_write_all("READY\n", 6);
            echo(0, 1);
            say("smoke: host closed session ");
            say_num(i);
            say("\n");
            if (i == sessions)
                break;
            if (plat_chan_reconnect() != 0)
                fail("plat_chan_reconnect");
        }
    }
    say("smoke: exiting with ");
    say_num((unsigned long long)code);
    say("\n");
    return code;
}
