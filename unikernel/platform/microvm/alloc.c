/*
 * alloc.c: malloc/calloc/realloc/free over one contiguous heap.
 *
 * Design (a small cousin of TLSF and dlmalloc):
 *  - Every chunk starts with a 16-byte header: the previous chunk's size
 *    and its own size with an in-use bit. Payloads are 16-byte aligned.
 *    Knowing both neighbours makes free() coalesce in O(1), so freed
 *    buffers merge back into large blocks instead of fragmenting.
 *  - Free chunks sit in segregated lists: exact 16-byte classes below
 *    1 KiB, then 8 classes per power of two. A bitmap finds the first
 *    non-empty list at or above a request's class, so malloc() is a good
 *    fit (worst case 12.5% internal slack on large blocks) in near O(1).
 *  - realloc() grows in place when the next chunk is free, which is the
 *    common case for a buffer that doubles (JSON output, growing arrays):
 *    the heap's tail is one big free chunk, so the last-allocated buffer
 *    can grow to the end of RAM without copying. Shrinking splits in place.
 *  - A zero-size, in-use sentinel at the end stops coalescing there.
 *
 * Single-threaded (the platform has one CPU and no interrupts). Not
 * hardened against heap corruption by the caller.
 */
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "microvm.h"

struct chunk {
    size_t prev_size;               /* size of the chunk just below */
    size_t size;                    /* this chunk's size | CHUNK_INUSE */
    struct chunk *next, *prev;      /* free-list links, only when free */
};

#define HDR          16ul           /* prev_size + size; payload follows */
#define ALIGN        16ul
#define MIN_CHUNK    32ul           /* header + the two free-list links */
#define CHUNK_INUSE  1ul

#define EXACT_LIMIT  1024ul         /* below: one list per 16 bytes */
#define EXACT_BINS   (EXACT_LIMIT / ALIGN)
#define SL_LOG2      3              /* 8 lists per power of two above */
#define LOG_BINS     ((64 - 10) << SL_LOG2)
#define NBINS        (EXACT_BINS + LOG_BINS)
#define BITMAP_WORDS ((NBINS + 63) / 64)

static struct chunk *bins[NBINS];
static uint64_t bitmap[BITMAP_WORDS];
static struct chunk *heap_first;
static struct chunk *heap_sentinel;
static size_t heap_size;

static size_t csize(const struct chunk *c) { return c->size & ~CHUNK_INUSE; }
static int inuse(const struct chunk *c) { return (c->size & CHUNK_INUSE) != 0; }
static struct chunk *next_chunk(struct chunk *c) { return (struct chunk *)((char *)c + csize(c)); }
static struct chunk *prev_chunk(struct chunk *c) { return (struct chunk *)((char *)c - c->prev_size); }
static void *payload(struct chunk *c) { return (char *)c + HDR; }
static struct chunk *chunk_of(void *p) { return (struct chunk *)((char *)p - HDR); }

/* Sets c's size and flag and tells the chunk above (boundary tag). */
static void set_chunk(struct chunk *c, size_t size, size_t flag)
{
    c->size = size | flag;
    next_chunk(c)->prev_size = size;
}

static unsigned bin_of(size_t size)
{
    if (size < EXACT_LIMIT)
        return (unsigned)(size / ALIGN);
    unsigned fl = 63u - (unsigned)__builtin_clzl(size);  /* >= 10 */
    unsigned sl = (unsigned)(size >> (fl - SL_LOG2)) & ((1u << SL_LOG2) - 1);
    return (unsigned)EXACT_BINS + ((fl - 10) << SL_LOG2) + sl;
}

static void bin_insert(struct chunk *c)
{
    unsigned b = bin_of(csize(c));
    c->prev = NULL;
    c->next = bins[b];
    if (c->next)
        c->next->prev = c;
    bins[b] = c;
    bitmap[b / 64] |= 1ull << (b % 64);
}

static void bin_remove(struct chunk *c)
{
    unsigned b = bin_of(csize(c));
    if (c->prev)
        c->prev->next = c->next;
    else
        bins[b] = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (!bins[b])
        bitmap[b / 64] &= ~(1ull << (b % 64));
}

/* First non-empty bin >= b, or NBINS. */
static unsigned bin_search(unsigned b)
{
    unsigned w = b / 64;
    uint64_t bits = bitmap[w] & (~0ull << (b % 64));
    for (;;) {
        if (bits)
            return w * 64 + (unsigned)__builtin_ctzll(bits);
        if (++w == BITMAP_WORDS)
            return NBINS;
        bits = bitmap[w];
    }
}

void alloc_init(uintptr_t lo, uintptr_t hi)
{
    lo = (lo + ALIGN - 1) & ~(ALIGN - 1);
    hi &= ~(ALIGN - 1);
    if (hi <= lo || hi - lo < MIN_CHUNK + HDR)
        return;                             /* no heap: malloc returns NULL */
    heap_first = (struct chunk *)lo;
    heap_sentinel = (struct chunk *)(hi - HDR);
    heap_size = hi - lo;
    heap_first->prev_size = 0;
    heap_sentinel->size = 0 | CHUNK_INUSE;
    set_chunk(heap_first, (uintptr_t)heap_sentinel - lo, 0);
    bin_insert(heap_first);
}

size_t alloc_heap_size(void)
{
    return heap_size;
}

/* Request size -> chunk size; 0 if it cannot be represented. */
static size_t chunk_size_for(size_t n)
{
    if (n > ((size_t)1 << 62))
        return 0;
    size_t size = (n + HDR + ALIGN - 1) & ~(ALIGN - 1);
    return size < MIN_CHUNK ? MIN_CHUNK : size;
}

/* Marks c (already out of the lists) in use with `size` bytes, returning
 * the tail to the free lists when it is big enough to be a chunk. */
static void take(struct chunk *c, size_t size)
{
    size_t have = csize(c);
    if (have - size >= MIN_CHUNK) {
        set_chunk(c, size, CHUNK_INUSE);
        struct chunk *rest = next_chunk(c);
        set_chunk(rest, have - size, 0);
        /* The chunk above rest may be free if we shrank in place. */
        struct chunk *above = next_chunk(rest);
        if (!inuse(above)) {
            bin_remove(above);
            set_chunk(rest, csize(rest) + csize(above), 0);
        }
        bin_insert(rest);
    } else {
        set_chunk(c, have, CHUNK_INUSE);
    }
}

void *malloc(size_t n)
{
    size_t size = chunk_size_for(n);
    if (size == 0 || heap_first == NULL)
        return NULL;
    unsigned b = bin_of(size);
    /* A log bin mixes sizes, so its first chunk may be too small: try the
     * request's own bin first-fit, then any higher bin fits whole. */
    for (struct chunk *c = bins[b]; c; c = c->next) {
        if (csize(c) >= size) {
            bin_remove(c);
            take(c, size);
            return payload(c);
        }
    }
    b = bin_search(b + 1);
    if (b == NBINS)
        return NULL;
    struct chunk *c = bins[b];
    bin_remove(c);
    take(c, size);
    return payload(c);
}

void free(void *p)
{
    if (p == NULL)
        return;
    struct chunk *c = chunk_of(p);
    size_t size = csize(c);
    struct chunk *above = next_chunk(c);
    if (!inuse(above)) {
        bin_remove(above);
        size += csize(above);
    }
    if (c != heap_first) {
        struct chunk *below = prev_chunk(c);
        if (!inuse(below)) {
            bin_remove(below);
            size += csize(below);
            c = below;
        }
    }
    set_chunk(c, size, 0);
    bin_insert(c);
}

void *calloc(size_t count, size_t size)
{
    size_t n;
    if (__builtin_mul_overflow(count, size, &n))
        return NULL;
    void *p = malloc(n);
    if (p)
        memset(p, 0, n);
    return p;
}

void *realloc(void *p, size_t n)
{
    if (p == NULL)
        return malloc(n);
    size_t size = chunk_size_for(n);
    if (size == 0)
        return NULL;
    struct chunk *c = chunk_of(p);
    size_t have = csize(c);
    if (size <= have) {
        take(c, size);
        return p;
    }
    struct chunk *above = next_chunk(c);
    if (!inuse(above) && have + csize(above) >= size) {
        bin_remove(above);
        set_chunk(c, have + csize(above), CHUNK_INUSE);
        take(c, size);
        return p;
    }
    void *q = malloc(n);
    if (q == NULL)
        return NULL;                        /* p stays valid, as C requires */
    memcpy(q, p, have - HDR);
    free(p);
    return q;
}
