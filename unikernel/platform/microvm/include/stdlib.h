/*
 * stdlib.h: the subset of <stdlib.h> the microvm platform provides: the
 * allocator (alloc.c) and abort(). Memory is 16-byte aligned; malloc(0)
 * returns a unique pointer; every call returns NULL when the heap is
 * exhausted (there is no overcommit: what is returned is really there).
 */
#ifndef MICROVM_STDLIB_H
#define MICROVM_STDLIB_H

#include <stddef.h>

void *malloc(size_t n);
void *calloc(size_t count, size_t size);
void *realloc(void *p, size_t n);
void free(void *p);

/* Reports on the console and exits with code 127. */
void abort(void) __attribute__((noreturn));

#endif /* MICROVM_STDLIB_H */
