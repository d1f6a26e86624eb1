/*
 * virtio_console.c: the host channel (plat_chan_*) over a virtio console.
 *
 * Two ways QEMU can provide it, both on -device virtio-serial-device:
 *
 *  1. A virtserialport (recommended):
 *       -device virtserialport,chardev=ch0,nr=1
 *     We negotiate VIRTIO_CONSOLE_F_MULTIPORT and speak the control queue
 *     protocol. This is the only reliable choice: QEMU throttles a
 *     virtserialport when the host socket is full, and it tells us when the
 *     host connects and disconnects, so writes wait for a reader and
 *     plat_chan_read() can report "peer closed".
 *  2. A virtconsole on port 0:
 *       -device virtconsole,chardev=ch0
 *     Used when the device has no other port. QEMU *drops* console output
 *     it cannot write to the socket at once (hw/char/virtio-console.c,
 *     flush_buf: consoles are never throttled) and while no host is
 *     connected, so guest->host bytes can be lost under load. We warn.
 *
 * Which port: the lowest-numbered port >= 1 the device announces, else
 * port 0. Busy, everything is polled; a wait with nothing to do halts the
 * CPU (idle() below, irq.c) until the device interrupts or the deadline
 * passes, so an idle guest costs no host CPU. Receive buffers are posted for the whole queue, so the
 * host can have VIRTQ_MAX_SIZE * RX_BUF_SIZE bytes in flight. Transmit is
 * zero-copy: descriptors point into the caller's buffer, and
 * plat_chan_write() returns once the device has consumed all of them.
 */
#include <string.h>

#include "platform.h"
#include "microvm.h"
#include "io.h"
#include "virtio_mmio.h"

#define VIRTIO_ID_CONSOLE          3
#define VIRTIO_CONSOLE_F_MULTIPORT (1ull << 1)

/* Control messages (virtio 1.x section 5.3.6.2). */
#define CTRL_DEVICE_READY 0
#define CTRL_PORT_ADD     1
#define CTRL_PORT_REMOVE  2
#define CTRL_PORT_READY   3
#define CTRL_CONSOLE_PORT 4
#define CTRL_PORT_OPEN    6

struct ctrl_msg {
    uint32_t id;
    uint16_t event;
    uint16_t value;
};

#define RX_BUF_SIZE       4096u     /* QEMU's chardev reads 4 KiB at a time */
#define TX_CHUNK          65536u
#define CTRL_BUF_SIZE     256u      /* a message plus a port name */
#define CTRL_QUEUE_MAX    32u
#define MAX_PORTS         32u
#define PORT_ADD_WAIT_NS  200000000ull  /* device announces ports at once */
#define PORT_ADD_GRACE_NS 1000000ull    /* ...and all of them in one burst */

/* Queue numbers: port 0 uses 0/1, control 2/3, port n >= 1 uses 2n+2/2n+3. */
static uint16_t rx_queue_of(uint32_t port) { return (uint16_t)(port == 0 ? 0 : 2 * port + 2); }
#define CTRL_RX_QUEUE 2
#define CTRL_TX_QUEUE 3

static uint8_t ring_mem[4][VIRTQ_MEM_SIZE] __attribute__((aligned(VIRTQ_ALIGN)));
static uint8_t rx_bufs[VIRTQ_MAX_SIZE][RX_BUF_SIZE] __attribute__((aligned(64)));
static uint8_t ctrl_bufs[CTRL_QUEUE_MAX][CTRL_BUF_SIZE] __attribute__((aligned(64)));
static struct ctrl_msg ctrl_out;

static struct vmmio dev;
static struct virtq rxq, txq, ctrl_rxq, ctrl_txq;
static int ready;                   /* vcon_init() succeeded */
static int multiport;
static uint32_t port;               /* the channel's port number */

/* Multiport bookkeeping, filled by control messages. */
static uint8_t port_added[MAX_PORTS];
static uint8_t port_is_console[MAX_PORTS];
static uint8_t port_host_open[MAX_PORTS];  /* the host side is connected */
/* Disconnects of our port, counted: a quick close + reconnect arrives as
 * two messages we may see in one poll, and must not go unnoticed. */
static uint32_t host_closes;
static uint32_t session_closes;     /* host_closes when the session began */
static int session_open;            /* the current controller is talking to us */

/* The receive buffer being consumed. */
static int rx_have;
static uint16_t rx_id;
static uint32_t rx_len, rx_off;

static char describe_buf[128];

/* Queues idle() can wait for. */
#define WAIT_RX      1u
#define WAIT_TX      2u
#define WAIT_CTRL    4u             /* control messages (connect, close) */
#define WAIT_CTRL_TX 8u

/* Called when the caller's wait condition is false: halts until one of the
 * queues in (which) may have completed something, or until (deadline_ns)
 * (0: none), or earlier. Callers re-check their condition in a loop.
 * Interrupts are enabled on the queues, then the queues re-checked, then
 * the CPU halted (with IF=0 throughout, see irq.c): a completion in
 * between leaves the interrupt pending and the halt returns at once. */
static void idle(unsigned which, unsigned long long deadline_ns)
{
    struct virtq *const qs[4] = { &rxq, &txq, &ctrl_rxq, &ctrl_txq };
    if (!irq_ready()) {
        cpu_relax();
        return;
    }
    int pending = 0;
    for (unsigned i = 0; i < 4; i++) {
        if ((which & (1u << i)) && qs[i]->num) {
            virtq_intr(qs[i], 1);
            pending |= virtq_has_used(qs[i]);
        }
    }
    if (!pending)
        irq_halt(deadline_ns);
    for (unsigned i = 0; i < 4; i++)
        if ((which & (1u << i)) && qs[i]->num)
            virtq_intr(qs[i], 0);
}

static void ctrl_send(uint32_t id, uint16_t event, uint16_t value)
{
    ctrl_out.id = id;
    ctrl_out.event = event;
    ctrl_out.value = value;
    ctrl_txq.desc[0].addr = (uintptr_t)&ctrl_out;
    ctrl_txq.desc[0].len = sizeof(ctrl_out);
    ctrl_txq.desc[0].flags = 0;
    virtq_post(&ctrl_txq, 0);
    vmmio_notify(&dev, &ctrl_txq);
    uint16_t id_done;
    uint32_t len;
    while (!virtq_take_used(&ctrl_txq, &id_done, &len))
        idle(WAIT_CTRL_TX, 0);
}

static void ctrl_handle(const struct ctrl_msg *m)
{
    if (m->id >= MAX_PORTS)
        return;
    switch (m->event) {
    case CTRL_PORT_ADD:
        port_added[m->id] = 1;
        ctrl_send(m->id, CTRL_PORT_READY, 1);
        break;
    case CTRL_PORT_REMOVE:
        if (m->id == port && port_host_open[m->id])
            host_closes++;
        port_added[m->id] = 0;
        port_host_open[m->id] = 0;
        break;
    case CTRL_CONSOLE_PORT:
        port_is_console[m->id] = 1;
        break;
    case CTRL_PORT_OPEN:
        if (m->id == port && port_host_open[m->id] && m->value == 0)
            host_closes++;
        port_host_open[m->id] = m->value != 0;
        break;
    default:
        break;                      /* RESIZE, PORT_NAME: not needed */
    }
}

/* Handles every control message the device has sent so far. */
static void ctrl_poll(void)
{
    uint16_t id;
    uint32_t len;
    int reposted = 0;
    while (virtq_take_used(&ctrl_rxq, &id, &len)) {
        if (id < CTRL_QUEUE_MAX && len >= sizeof(struct ctrl_msg)) {
            struct ctrl_msg m;
            memcpy(&m, ctrl_bufs[id], sizeof(m));
            ctrl_handle(&m);
        }
        virtq_post(&ctrl_rxq, id);
        reposted = 1;
    }
    if (reposted)
        vmmio_notify(&dev, &ctrl_rxq);
}

static int setup_queue(struct virtq *q, uint16_t index, uint16_t limit, void *mem)
{
    uint16_t max = vmmio_queue_max(&dev, index);
    if (max == 0)
        return -1;
    uint16_t num = 1;
    while ((uint16_t)(num * 2) <= max && num * 2 <= limit)
        num *= 2;                   /* our ring indexing needs a power of two */
    virtq_init(q, index, num, mem);
    vmmio_queue_enable(&dev, q);
    return 0;
}

/* Multiport: announce ourselves, let the device list its ports, pick ours.
 * The device sends every PORT_ADD in one burst after DEVICE_READY. */
static int choose_port(void)
{
    for (uint16_t i = 0; i < ctrl_rxq.num; i++) {
        ctrl_rxq.desc[i].addr = (uintptr_t)ctrl_bufs[i];
        ctrl_rxq.desc[i].len = CTRL_BUF_SIZE;
        ctrl_rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
        virtq_post(&ctrl_rxq, i);
    }
    vmmio_notify(&dev, &ctrl_rxq);
    ctrl_send(0, CTRL_DEVICE_READY, 1);

    unsigned long long start = plat_monotonic_ns(), first = 0;
    for (;;) {
        ctrl_poll();
        unsigned long long now = plat_monotonic_ns();
        int any = 0;
        for (uint32_t i = 0; i < MAX_PORTS; i++)
            any |= port_added[i];
        if (any && first == 0)
            first = now;
        if (first != 0 && now - first >= PORT_ADD_GRACE_NS)
            break;
        if (first == 0 && now - start >= PORT_ADD_WAIT_NS)
            return -1;
        idle(WAIT_CTRL, first ? first + PORT_ADD_GRACE_NS : start + PORT_ADD_WAIT_NS);
    }
    for (port = 1; port < MAX_PORTS && !port_added[port]; port++)
        ;
    if (port == MAX_PORTS)
        port = 0;
    return 0;
}

static void post_rx_buffers(void)
{
    for (uint16_t i = 0; i < rxq.num; i++) {
        rxq.desc[i].addr = (uintptr_t)rx_bufs[i];
        rxq.desc[i].len = RX_BUF_SIZE;
        rxq.desc[i].flags = VIRTQ_DESC_F_WRITE;
        virtq_post(&rxq, i);
    }
}

static char *append(char *p, const char *s)
{
    size_t n = strlen(s);
    memcpy(p, s, n);
    return p + n;
}

static char *append_dec(char *p, unsigned v)
{
    if (v >= 10)
        p = append_dec(p, v / 10);
    *p = (char)('0' + v % 10);
    return p + 1;
}

/* For the boot log line: which transport and port carry the channel. */
static void describe(void)
{
    char *p = describe_buf;
    p = append(p, "virtio-mmio slot ");
    p = append_dec(p, dev.slot);
    p = append(p, dev.version == 1 ? " (legacy), port " : " (virtio 1.x), port ");
    p = append_dec(p, port);
    p = append(p, !multiport ? " virtconsole, no multiport: output may be dropped"
                  : port_is_console[port] ? " virtconsole: output may be dropped"
                  : " virtserialport");
    *p = 0;
}

int vcon_init(void)
{
    if (vmmio_find(VIRTIO_ID_CONSOLE, &dev) != 0)
        return -1;
    irq_route_virtio(dev.slot, dev.base);
    uint64_t features;
    if (vmmio_negotiate(&dev, VIRTIO_CONSOLE_F_MULTIPORT, &features) != 0)
        return -1;
    multiport = (features & VIRTIO_CONSOLE_F_MULTIPORT) != 0;

    if (multiport) {
        if (setup_queue(&ctrl_rxq, CTRL_RX_QUEUE, CTRL_QUEUE_MAX, ring_mem[2]) != 0 ||
            setup_queue(&ctrl_txq, CTRL_TX_QUEUE, CTRL_QUEUE_MAX, ring_mem[3]) != 0)
            goto fail;
        /* Data queues of all ports must be known before DRIVER_OK on a
         * modern device, but we learn our port only afterwards; QEMU accepts
         * queues enabled later, and so does the legacy interface. */
        vmmio_driver_ok(&dev);
        if (choose_port() != 0)
            goto fail;
    } else {
        port = 0;
    }

    uint16_t rx = rx_queue_of(port);
    if (setup_queue(&rxq, rx, VIRTQ_MAX_SIZE, ring_mem[0]) != 0 ||
        setup_queue(&txq, (uint16_t)(rx + 1), VIRTQ_MAX_SIZE, ring_mem[1]) != 0)
        goto fail;
    post_rx_buffers();
    if (!multiport) {
        vmmio_driver_ok(&dev);
    } else {
        ctrl_send(port, CTRL_PORT_OPEN, 1);  /* guest side open: data may flow */
        ctrl_poll();
    }
    vmmio_notify(&dev, &rxq);
    describe();
    ready = 1;
    return 0;
fail:
    vmmio_fail(&dev);
    return -1;
}

const char *vcon_describe(void)
{
    return ready ? describe_buf : "none";
}

/* Blocks until a controller is connected (always true without multiport)
 * and marks the session open. */
static int host_connected(void)
{
    return !multiport || port_host_open[port];
}

static void wait_for_host(void)
{
    for (;;) {
        ctrl_poll();
        if (host_connected())
            break;
        idle(WAIT_CTRL, 0);
    }
    session_open = 1;
    session_closes = host_closes;
}

/* The current controller went away (only observable with multiport). */
static int session_lost(void)
{
    if (multiport)
        ctrl_poll();
    return session_open && (host_closes != session_closes || !host_connected());
}

/* Makes rx_have true if a filled buffer is waiting; never blocks. */
static int rx_fill(void)
{
    if (!rx_have && virtq_take_used(&rxq, &rx_id, &rx_len)) {
        rx_have = 1;
        rx_off = 0;
    }
    return rx_have;
}

long plat_chan_read(void *buf, unsigned long n)
{
    if (!ready)
        return -1;
    if (n == 0)
        return 0;
    if (!session_open)
        wait_for_host();
    while (!rx_fill()) {
        if (session_lost())
            return 0;
        idle(WAIT_RX | WAIT_CTRL, 0);
    }
    unsigned long got = 0;
    int reposted = 0;
    while (got < n && rx_fill()) {
        uint32_t take = rx_len - rx_off;
        if (take > n - got)
            take = (uint32_t)(n - got);
        memcpy((char *)buf + got, rx_bufs[rx_id] + rx_off, take);
        got += take;
        rx_off += take;
        if (rx_off >= rx_len) {
            virtq_post(&rxq, rx_id);
            rx_have = 0;
            reposted = 1;
        }
    }
    /* The kick lets QEMU resume reading the socket if it ran out of room. */
    if (reposted)
        vmmio_notify(&dev, &rxq);
    return (long)got;
}

long plat_chan_write(const void *buf, unsigned long n)
{
    if (!ready)
        return -1;
    if (!session_open)
        wait_for_host();
    const char *p = buf;
    unsigned long left = n;
    while (left > 0) {
        if (session_lost())
            return -1;
        uint16_t posted = 0;
        while (left > 0 && posted < txq.num) {
            uint32_t len = left > TX_CHUNK ? TX_CHUNK : (uint32_t)left;
            txq.desc[posted].addr = (uintptr_t)p;
            txq.desc[posted].len = len;
            txq.desc[posted].flags = 0;
            virtq_post(&txq, posted);
            posted++;
            p += len;
            left -= len;
        }
        vmmio_notify(&dev, &txq);
        /* QEMU completes a descriptor once the socket took it, or discards
         * it when the host disconnects, so this wait always ends. */
        uint16_t done = 0, id;
        uint32_t len;
        while (done < posted) {
            if (virtq_take_used(&txq, &id, &len))
                done++;
            else {
                if (multiport)
                    ctrl_poll();
                idle(WAIT_TX | WAIT_CTRL, 0);
            }
        }
    }
    /* Like a socket write: success means the bytes were handed over, not
     * that the peer read them. A host that left meanwhile is reported by
     * the next call (read returns 0). Checking here would turn a host that
     * closes right after reading our last bytes into a spurious error. */
    return (long)n;
}

int plat_chan_poll(void)
{
    if (!ready)
        return 0;
    if (rx_fill())
        return 1;
    return session_lost();
}

int plat_chan_wait(unsigned long long deadline_ns)
{
    while (!plat_chan_poll()) {
        if (plat_monotonic_ns() >= deadline_ns)
            return 0;
        idle(WAIT_RX | WAIT_CTRL, deadline_ns);
    }
    return 1;
}

int plat_chan_reconnect(void)
{
    if (!ready || !multiport)
        return -1;                  /* a virtconsole never reports a close */
    /* Nothing is discarded: plat_chan_read() returned 0 only once the old
     * controller's bytes were consumed, so whatever is buffered now was
     * sent by the next one. */
    session_open = 0;
    wait_for_host();
    return 0;
}
