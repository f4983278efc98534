/* For bench/run.py --fsync-delay-ms: preloaded (LD_PRELOAD) into the processes of a
 * benchmark run, it makes each fsync and fdatasync wait BENCH_FSYNC_DELAY_US more
 * microseconds before it runs, as on a disk whose flushes are slow (a hard disk, a
 * consumer SSD without power-loss protection, a ZFS pool without a log device). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void delay(void) {
    const char *text = getenv("BENCH_FSYNC_DELAY_US");
    long us = text ? atol(text) : 0;
    if (us > 0) {
        struct timespec pause = {us / 1000000, (us % 1000000) * 1000};
        nanosleep(&pause, NULL);
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    delay();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    delay();
    return real(fd);
}
