/* A garbage flooder for tests/net/test_attacks.py (issue 16): sends UDP datagrams to one
 * address as fast as it can for a number of seconds, in batches (sendmmsg), then prints how
 * many it sent.  The mix, in turn: random bytes (half); STUN with its cookie and a length
 * that fits (it passes the kernel filter and meets the unknown-source limit); DTLS-shaped;
 * ipop frames addressed to the target's UID from random UIDs; TURN ChannelData.
 *   flooder DST_IP DST_PORT SECONDS TARGET_UID_HEX */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define KINDS 8
#define SIZE 200

static unsigned long long rnd = 88172645463325252ULL;
static unsigned char next(void) {
    rnd ^= rnd << 13; rnd ^= rnd >> 7; rnd ^= rnd << 17;
    return (unsigned char)rnd;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage\n"); return 2; }
    unsigned char uid[20];
    for (int i = 0; i < 20; i++) sscanf(argv[4] + 2 * i, "%2hhx", &uid[i]);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("socket"); return 1; }
    static unsigned char buf[BATCH][SIZE];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        unsigned char *p = buf[i];
        for (int j = 0; j < SIZE; j++) p[j] = next();
        switch (i % KINDS) {
        case 0: case 1: case 2: case 3: break;                       /* random bytes */
        case 4: p[0] = 0; p[1] = 1; p[2] = 0; p[3] = 0; p[4] = 0x21; p[5] = 0x12; p[6] = 0xa4; p[7] = 0x42; break;
        case 5: p[0] = 22; p[1] = 0xfe; p[2] = 0xfd; break;          /* DTLS-shaped */
        case 6: p[0] = 0x87; memcpy(p + 21, uid, 20); break;         /* a frame for the target */
        case 7: p[0] = 0x40; p[2] = 0; p[3] = 100; break;            /* ChannelData */
        }
        iov[i].iov_base = p;
        iov[i].iov_len = 60 + (i * 7) % (SIZE - 60);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double seconds = atof(argv[3]);
    unsigned long long sent = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        double el = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
        if (el >= seconds) break;
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) sent += n;
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
    double el = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
    printf("{\"sent\": %llu, \"seconds\": %.3f}\n", sent, el);
    return 0;
}
