/*
 * plat_defaults.c: weak fallbacks for the OPTIONAL platform functions of
 * platform.h, so a target that does not provide them still links.
 */
#include "../platform/platform.h"

__attribute__((weak)) int plat_chan_wait(unsigned long long deadline_ns)
{
    /* No way to sleep here: poll until data or the deadline. */
    while (!plat_chan_poll()) {
        if (plat_monotonic_ns() >= deadline_ns)
            return 0;
    }
    return 1;
}

__attribute__((weak)) int plat_chan_reconnect(void)
{
    return -1;
}
