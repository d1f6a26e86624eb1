/*
 * main.c: the unix target. Runs a Ferry app as an ordinary process whose
 * channel is an inherited file descriptor (--fd N) or a TCP connection it
 * accepts (--listen HOST:PORT, one controller at a time; a new one may
 * connect after the previous one left, and the guest's state is kept).
 * The console is stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include "../platform.h"

static int chan_fd = -1;
static int listen_fd = -1;

long plat_chan_read(void *buf, unsigned long n)
{
    for (;;) {
        ssize_t r = read(chan_fd, buf, n);
        if (r >= 0)
            return (long)r;
        if (errno != EINTR)
            return -1;
    }
}

long plat_chan_write(const void *buf, unsigned long n)
{
    const char *p = buf;
    unsigned long left = n;

    while (left > 0) {
        ssize_t r = write(chan_fd, p, left);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += r;
        left -= (unsigned long)r;
    }
    return (long)n;
}

static int wait_readable(int timeout_ms)
{
    struct pollfd pfd = {.fd = chan_fd, .events = POLLIN};

    for (;;) {
        int r = poll(&pfd, 1, timeout_ms);
        if (r >= 0)
            return r > 0;
        if (errno != EINTR)
            return 1;   /* let the read report the error */
    }
}

int plat_chan_poll(void)
{
    return wait_readable(0);
}

unsigned long long plat_monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL +
           (unsigned long long)ts.tv_nsec;
}

int plat_chan_wait(unsigned long long deadline_ns)
{
    for (;;) {
        unsigned long long now = plat_monotonic_ns();
        unsigned long long left_ms;

        if (plat_chan_poll())
            return 1;
        if (now >= deadline_ns)
            return 0;
        left_ms = (deadline_ns - now + 999999ULL) / 1000000ULL;
        if (wait_readable(left_ms > 60000 ? 60000 : (int)left_ms))
            return 1;
    }
}

void plat_console(const char *s, unsigned long n)
{
    while (n > 0) {
        ssize_t r = write(2, s, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        s += r;
        n -= (unsigned long)r;
    }
}

void plat_exit(int code)
{
    exit(code);
}

const char *plat_name(void)
{
    return "unix";
}

static int accept_controller(void)
{
    for (;;) {
        int one = 1;
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return -1;
        }
        /* Frames are small and latency-bound. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        chan_fd = fd;
        return 0;
    }
}

int plat_chan_reconnect(void)
{
    if (listen_fd < 0)
        return -1;
    close(chan_fd);
    chan_fd = -1;
    return accept_controller();
}

static void usage(void)
{
    fprintf(stderr, "usage: APP --fd N | --listen HOST:PORT\n"
                    "  --fd N             speak the Ferry channel on inherited fd N\n"
                    "  --listen HOST:PORT accept controllers on TCP (PORT 0: any;\n"
                    "                     the chosen port is logged on stderr)\n");
    exit(64);
}

/*
 * Numeric addresses only (IPv4, or IPv6 in brackets; "localhost" means
 * 127.0.0.1): name lookup would need NSS, which a static binary lacks.
 */
static int open_listener(const char *spec)
{
    char host[64];
    const char *colon = strrchr(spec, ':');
    struct sockaddr_storage addr, bound;
    socklen_t alen, blen = sizeof(bound);
    size_t hlen;
    char *end;
    long port;
    int fd, one = 1, bound_port = 0;

    if (colon == NULL || (hlen = (size_t)(colon - spec)) >= sizeof(host))
        usage();
    memcpy(host, spec, hlen);
    host[hlen] = '\0';
    port = strtol(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end != '\0' || port < 0 || port > 65535)
        usage();
    memset(&addr, 0, sizeof(addr));
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&addr;
        host[hlen - 1] = '\0';
        if (inet_pton(AF_INET6, host + 1, &a6->sin6_addr) != 1)
            usage();
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        alen = sizeof(*a6);
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&addr;
        const char *h = (hlen == 0) ? "0.0.0.0"
                      : strcmp(host, "localhost") == 0 ? "127.0.0.1" : host;
        if (inet_pton(AF_INET, h, &a4->sin_addr) != 1)
            usage();
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        alen = sizeof(*a4);
    }
    fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, (struct sockaddr *)&addr, alen) < 0 || listen(fd, 1) < 0) {
        fprintf(stderr, "ferry: cannot listen on %s: %s\n", spec, strerror(errno));
        exit(69);
    }
    if (getsockname(fd, (struct sockaddr *)&bound, &blen) == 0) {
        if (bound.ss_family == AF_INET)
            bound_port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
        else if (bound.ss_family == AF_INET6)
            bound_port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    }
    fprintf(stderr, "ferry: listening on %s port %d\n", host, bound_port);
    return fd;
}

int main(int argc, char **argv)
{
    const char *listen_spec = NULL;
    int fd = -1;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end != '\0' || v < 0 || v > 65535)
                usage();
            fd = (int)v;
        } else if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            listen_spec = argv[++i];
        } else {
            usage();
        }
    }
    if ((fd < 0) == (listen_spec == NULL))
        usage();
    /* A vanished controller must show up as a failed write, not a kill. */
    signal(SIGPIPE, SIG_IGN);
    if (listen_spec != NULL) {
        listen_fd = open_listener(listen_spec);
        if (accept_controller() != 0) {
            fprintf(stderr, "ferry: accept failed: %s\n", strerror(errno));
            return 69;
        }
    } else {
        chan_fd = fd;
    }
    plat_exit(ferry_runtime_main(""));
}
