/*
 * scalars.h: reads a flat JSON object of scalars (START params, INPUT
 * payloads) into a kv map: integers as KV_INT64, other numbers as
 * KV_FLOAT64, strings, bools.
 */
#ifndef FERRY_SCALARS_H
#define FERRY_SCALARS_H

#include <stdbool.h>

#include "json_parse.h"
#include "kv.h"

/*
 * Parses the object at (j) into (out), which must be empty. Members that
 * are null, objects or arrays are skipped when (skip_nested) is true and
 * are an error otherwise; a duplicate name is an error. On error, (j)->err
 * says why and (out) may hold a prefix (the caller clears it).
 */
bool scalars_read(struct jp *j, struct kv *out, bool skip_nested);

#endif /* FERRY_SCALARS_H */
