/*
 * diskio: the rig guest's disk I/O load and its proof that the disk kept its data.
 *
 * Runs beside the ticker in the disk guest (started by init-disk when a virtio disk is
 * present).  It writes one 4 KiB block after another, round-robin over the first BLOCKS
 * blocks of the disk, with O_DIRECT (every write and read reaches the device, none is
 * served by the guest's page cache).  Write number i goes to block i % BLOCKS and holds a
 * pattern derived from a random token picked at boot (kept only in guest RAM) and i.  After
 * each write it reads back the block written BLOCKS/2 writes earlier and checks it holds
 * exactly that write's pattern: data written before a pause is read after it.  Every
 * ~100 ms of guest time it prints one line to the console:
 *
 *     DISK <writes> <token:16 hex> <ok|BAD> <blocks-verified>
 *
 * "BAD" is sticky: once a block read back wrong, or an I/O failed, every later line says so
 * (with a "DISK-ERROR ..." line naming the first failure).  A test that sees the write count
 * grow, one token and only "ok" knows the disk went on working and kept what it was given.
 * Before the first DISK line it prints "DISKBOOT <token> <device> <blocks>".
 *
 * Build: gcc -static -O2 -o diskio diskio.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif

#define BLOCK 4096UL
#define BLOCKS 2048UL                     /* 8 MiB written round-robin */
#define LAG (BLOCKS / 2)                  /* read back the write made LAG writes ago */
#define WORDS (BLOCK / 8)
#define PACE_NS 2000000L                  /* one write + one read every ~2 ms */
#define REPORT_NS 100000000L              /* one line every ~100 ms */

static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t pick_token(void)
{
    uint64_t t = 0;
    if (getrandom(&t, sizeof t, GRND_INSECURE) != (ssize_t)sizeof t)
        (void)getrandom(&t, sizeof t, GRND_NONBLOCK);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    t ^= mix(((uint64_t)hi << 32 | lo) ^ (uint64_t)ts.tv_nsec ^ 0xd15cULL);
    return t ? t : 1;
}

static void fill(uint64_t *buf, uint64_t token, uint64_t n)
{
    for (uint64_t k = 0; k < WORDS; k++)
        buf[k] = mix(token ^ (n << 12) ^ k);
}

static int same(const uint64_t *buf, uint64_t token, uint64_t n)
{
    for (uint64_t k = 0; k < WORDS; k++)
        if (buf[k] != mix(token ^ (n << 12) ^ k))
            return 0;
    return 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    static char outbuf[256];
    setvbuf(stdout, outbuf, _IOLBF, sizeof outbuf);
    const char *dev = argc > 1 ? argv[1] : "/dev/vda";

    int fd = -1;
    for (int tries = 0; fd < 0 && tries < 200; tries++) {  /* the device node may be late */
        fd = open(dev, O_RDWR | O_DIRECT);
        if (fd < 0)
            usleep(50000);
    }
    if (fd < 0) {
        printf("DISK-ERROR open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t *wbuf, *rbuf;
    if (posix_memalign((void **)&wbuf, BLOCK, BLOCK) || posix_memalign((void **)&rbuf, BLOCK, BLOCK)) {
        printf("DISK-ERROR memalign\n");
        return 1;
    }
    uint64_t token = pick_token();
    printf("DISKBOOT %016llx %s %lu\n", (unsigned long long)token, dev, (unsigned long)BLOCKS);

    uint64_t writes = 0, verified = 0;
    int all_ok = 1;
    int64_t next_report = now_ns() + REPORT_NS;
    struct timespec pace = {0, PACE_NS};
    for (;;) {
        fill(wbuf, token, writes);
        ssize_t n = pwrite(fd, wbuf, BLOCK, (off_t)((writes % BLOCKS) * BLOCK));
        if (n != (ssize_t)BLOCK) {
            if (all_ok)
                printf("DISK-ERROR write %llu: %s\n", (unsigned long long)writes,
                       n < 0 ? strerror(errno) : "short write");
            all_ok = 0;
        }
        writes++;
        if (writes > LAG) {
            uint64_t old = writes - 1 - LAG;
            n = pread(fd, rbuf, BLOCK, (off_t)((old % BLOCKS) * BLOCK));
            if (n != (ssize_t)BLOCK || !same(rbuf, token, old)) {
                if (all_ok)
                    printf("DISK-ERROR read %llu: %s\n", (unsigned long long)old,
                           n < 0 ? strerror(errno) : n != (ssize_t)BLOCK ? "short read"
                                                                         : "wrong data");
                all_ok = 0;
            } else {
                verified++;
            }
        }
        if (now_ns() >= next_report) {
            printf("DISK %llu %016llx %s %llu\n", (unsigned long long)writes,
                   (unsigned long long)token, all_ok ? "ok" : "BAD",
                   (unsigned long long)verified);
            next_report = now_ns() + REPORT_NS;
        }
        while (nanosleep(&pace, NULL) < 0 && errno == EINTR)
            ;
    }
}
