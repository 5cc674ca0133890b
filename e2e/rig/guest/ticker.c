/*
 * ticker: the rig guest's proof of continuity.
 *
 * Runs in the guest's initramfs (started by /init).  At boot it picks a random 64-bit token
 * that lives only in guest RAM and fills a RAM buffer with a pattern derived from it.  Then,
 * every 10 ms (monotonic clock, absolute deadlines), it verifies the next slice of the buffer
 * (rotating over the whole buffer) and prints one line to the console:
 *
 *     TICK <counter> <token:16 hex> <ok|BAD> <bytes-verified-so-far>
 *
 * counter starts at 0 and grows by exactly 1 per line.  A test that sees one token, a
 * counter without holes and only "ok" knows the guest neither rebooted nor lost memory.
 * Before the first TICK it prints "BOOT <token> <buffer-bytes>".
 *
 * Build: gcc -static -O2 -o ticker ticker.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif

#define TICK_NS 10000000L                 /* 10 ms */
#define BUF_BYTES (32UL << 20)            /* 32 MiB checked RAM */
#define SLICE_BYTES (128UL << 10)         /* verified per tick: full pass every 2.56 s */
#define WORDS (BUF_BYTES / 8)
#define SLICE_WORDS (SLICE_BYTES / 8)

static inline uint64_t mix(uint64_t x)
{
    /* splitmix64 finaliser: a cheap, position-dependent pattern */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t pick_token(void)
{
    uint64_t t = 0;
    ssize_t n = getrandom(&t, sizeof t, GRND_INSECURE);
    if (n != (ssize_t)sizeof t)
        n = getrandom(&t, sizeof t, GRND_NONBLOCK);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    /* mix in the clock and the TSC whatever getrandom gave */
    t ^= mix(((uint64_t)hi << 32 | lo) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 48));
    return t ? t : 1;
}

static void ts_add(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static int ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

int main(void)
{
    /* line-buffered output: one write(2) per line */
    static char outbuf[256];
    setvbuf(stdout, outbuf, _IOLBF, sizeof outbuf);

    uint64_t token = pick_token();
    uint64_t *buf = mmap(NULL, BUF_BYTES, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED) {
        printf("TICKER-ERROR mmap %s\n", strerror(errno));
        return 1;
    }
    for (uint64_t i = 0; i < WORDS; i++)
        buf[i] = mix(token ^ i);
    printf("BOOT %016llx %lu\n", (unsigned long long)token, (unsigned long)BUF_BYTES);

    uint64_t counter = 0, verified = 0, pos = 0;
    int all_ok = 1;
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        int ok = 1;
        for (uint64_t k = 0; k < SLICE_WORDS; k++) {
            uint64_t i = pos + k;
            if (buf[i] != mix(token ^ i))
                ok = 0;
        }
        pos = (pos + SLICE_WORDS) % WORDS;
        verified += SLICE_BYTES;
        if (!ok)
            all_ok = 0;
        /* once BAD, always BAD: a lost page must not be forgotten at the next pass */
        printf("TICK %llu %016llx %s %llu\n", (unsigned long long)counter,
               (unsigned long long)token, (ok && all_ok) ? "ok" : "BAD",
               (unsigned long long)verified);
        counter++;

        ts_add(&next, TICK_NS);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (ts_before(&next, &now)) {
            /* fell behind (e.g. the VM was paused): do not burst, restart the cadence */
            next = now;
            ts_add(&next, TICK_NS);
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
}
