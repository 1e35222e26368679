/* The upper bound for bench/network.py: a bare TCP relay in C, no policy, no CONNECT
 * exchange, the same splice loop as Corral's policy proxy (one thread per direction, a
 * 1 MiB pipe, SPLICE_F_MOVE). Usage: splice_relay UPSTREAM_PORT; prints its own port.
 * Bench only: it listens and connects on 127.0.0.1 and nowhere else. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_SIZE (1 << 20)

static struct sockaddr_in upstream;

struct direction {
    int from, to;
};

static void *pump(void *arg) {
    struct direction *d = arg;
    int pipe_fds[2];
    if (pipe(pipe_fds) == 0) {
        fcntl(pipe_fds[1], F_SETPIPE_SZ, PIPE_SIZE);
        ssize_t moved;
        while ((moved = splice(d->from, NULL, pipe_fds[1], NULL, PIPE_SIZE, SPLICE_F_MOVE)) > 0) {
            while (moved > 0) {
                ssize_t sent = splice(pipe_fds[0], NULL, d->to, NULL, moved, SPLICE_F_MOVE);
                if (sent <= 0)
                    goto done;
                moved -= sent;
            }
        }
    done:
        close(pipe_fds[0]);
        close(pipe_fds[1]);
    }
    shutdown(d->to, SHUT_WR);
    return NULL;
}

static void *serve(void *arg) {
    int client = (int)(long)arg;
    int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server >= 0 && connect(server, (struct sockaddr *)&upstream, sizeof upstream) == 0) {
        struct direction forth = {client, server}, back = {server, client};
        pthread_t back_thread;
        if (pthread_create(&back_thread, NULL, pump, &back) == 0) {
            pump(&forth);
            pthread_join(back_thread, NULL);
        }
    }
    if (server >= 0)
        close(server);
    close(client);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: splice_relay UPSTREAM_PORT\n");
        return 2;
    }
    upstream.sin_family = AF_INET;
    upstream.sin_port = htons((unsigned short)atoi(argv[1]));
    upstream.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof local;
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&local, sizeof local) != 0 ||
        listen(listener, 512) != 0 || getsockname(listener, (struct sockaddr *)&local, &length)) {
        perror("splice_relay");
        return 1;
    }
    printf("%d\n", ntohs(local.sin_port));
    fflush(stdout);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        pthread_t thread;
        if (client < 0)
            continue;
        if (pthread_create(&thread, NULL, serve, (void *)(long)client) != 0)
            close(client);
        else
            pthread_detach(thread);
    }
}
