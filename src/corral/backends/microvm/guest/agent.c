/* Corral's guest agent: PID 1 of the micro-VM, speaking framed messages on a virtio-serial port.
 *
 * A frame is one type byte, a 4-byte big-endian payload length, then the payload.
 *   host -> guest: M mount the shared root (payload: 9p options NUL, then tmpfs paths NUL each)
 *                  X exec (payload: cwd NUL argc NUL argv... NUL env... NUL)
 *                  T exec on a terminal (payload: rows, columns as 2-byte big-endian, then X's)
 *                  W resize the terminal (rows, columns as 2-byte big-endian)
 *                  I stdin data (empty = end of input)   S signal the workload (1 byte)
 *                  K kill every workload process   N entropy to mix into the guest's random pool
 *   guest -> host: H ready   A mounted   O stdout   R stderr   Q exit status (4 bytes)   E error text
 * One exec runs at a time. The workload is chrooted into the shared root, in its own session;
 * when its main process exits every other workload process is killed (as the process backend's
 * PID namespace does), so leftover background jobs cannot hold the output streams open, and
 * the guest's caches are synced so the host sees every write before the exit status.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define ROOT "/newroot"
#define CHUNK 65536

static int port = -1;

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) _exit(3); /* the host end is gone: nothing left to serve */
        buf += w;
        n -= (size_t)w;
    }
}

static int read_all(int fd, char *buf, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, buf, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One write per frame when it fits: every write to the port is a round trip to QEMU, which
 * costs tens of microseconds under emulation. */
static void send_frame(char type, const void *data, uint32_t n) {
    static char buf[5 + CHUNK];
    char hdr[5] = {type, (char)(n >> 24), (char)(n >> 16), (char)(n >> 8), (char)n};
    if (n <= CHUNK) {
        memcpy(buf, hdr, sizeof hdr);
        if (n) memcpy(buf + sizeof hdr, data, n);
        write_all(port, buf, sizeof hdr + n);
        return;
    }
    write_all(port, hdr, sizeof hdr);
    write_all(port, data, n);
}

static void send_error(const char *what, const char *path) {
    char msg[512];
    int len = snprintf(msg, sizeof msg, "%s %s: %s", what, path, strerror(errno));
    send_frame('E', msg, (uint32_t)len);
}

/* Reads one frame; the payload is NUL-terminated for convenience. */
static char *read_frame(char *type, uint32_t *n) {
    unsigned char hdr[5];
    if (read_all(port, (char *)hdr, sizeof hdr) < 0) _exit(4);
    *type = (char)hdr[0];
    *n = ((uint32_t)hdr[1] << 24) | ((uint32_t)hdr[2] << 16) | ((uint32_t)hdr[3] << 8) | hdr[4];
    char *payload = malloc(*n + 1);
    if (!payload || read_all(port, payload, *n) < 0) _exit(4);
    payload[*n] = 0;
    return payload;
}

static int mount_dev(void) {
    static const struct { const char *name; int major, minor; } nodes[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
    };
    static const char *links[][2] = {
        {"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"},
        {"/proc/self/fd/2", "stderr"}, {"pts/ptmx", "ptmx"},
    };
    char path[64];
    if (mount("tmpfs", ROOT "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")) return -1;
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        snprintf(path, sizeof path, ROOT "/dev/%s", nodes[i].name);
        if (mknod(path, S_IFCHR | 0666, makedev(nodes[i].major, nodes[i].minor))) return -1;
        chmod(path, 0666);
    }
    if (mkdir(ROOT "/dev/pts", 0755) || mkdir(ROOT "/dev/shm", 01777)) return -1;
    if (mount("devpts", ROOT "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"))
        return -1;
    if (mount("tmpfs", ROOT "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")) return -1;
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        snprintf(path, sizeof path, ROOT "/dev/%s", links[i][1]);
        if (symlink(links[i][0], path)) return -1;
    }
    return 0;
}

static void setup_root(char *payload, uint32_t n) {
    char path[4096];
    mkdir(ROOT, 0755);
    if (mount("root", ROOT, "9p", 0, payload)) return send_error("mount 9p", ROOT);
    if (mount("proc", ROOT "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
        return send_error("mount proc", ROOT "/proc");
    if (mount_dev()) return send_error("build", ROOT "/dev");
    for (char *p = payload + strlen(payload) + 1; p < payload + n; p += strlen(p) + 1) {
        snprintf(path, sizeof path, ROOT "%s", p);
        if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")) return send_error("mount tmpfs", p);
    }
    send_frame('A', NULL, 0);
}

/* Guests resumed from one snapshot start with the same random pool: mix in the host's bytes. */
static void reseed(const char *data, uint32_t n) {
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        write_all(fd, data, n);
        ioctl(fd, RNDRESEEDCRNG); /* a write only feeds the input pool; make the output use it now */
        close(fd);
    }
}

static int exit_code(int status) {
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void child(const char *cwd, char **argv, char **envp, int in, int out, int err) {
    setsid();
    if (isatty(in)) ioctl(in, TIOCSCTTY, 0); /* a terminal exec: it becomes the session's */
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (chroot(ROOT) || chdir(cwd)) {
        dprintf(2, "corral: cannot enter %s: %s\n", cwd, strerror(errno));
        _exit(127);
    }
    execve(argv[0], argv, envp);
    dprintf(2, "corral: cannot execute %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static void set_size(int tty, const unsigned char *size) {
    struct winsize ws = {.ws_row = (unsigned short)(size[0] << 8 | size[1]),
                         .ws_col = (unsigned short)(size[2] << 8 | size[3])};
    ioctl(tty, TIOCSWINSZ, &ws);
}

/* Forwards output and input until the workload and every process it left behind are gone.
 * ``tty``: the terminal's master side for a terminal exec (else -1); ``in`` is then a dup of it
 * and ``err`` is -1 (the workload's three streams are the terminal). */
static void supervise(pid_t pid, int sigfd, int in, int out, int err, int tty) {
    char *pending = NULL; /* stdin bytes the workload has not read yet */
    size_t npending = 0;
    int stdin_done = 0, status = -1;
    char buf[CHUNK];
    while (out >= 0 || err >= 0 || status < 0) {
        struct pollfd fds[5] = {
            {port, POLLIN, 0}, {sigfd, POLLIN, 0}, {out, POLLIN, 0}, {err, POLLIN, 0},
            {npending ? in : -1, POLLOUT, 0},
        };
        if (poll(fds, 5, -1) < 0) continue;
        if (fds[1].revents) {
            struct signalfd_siginfo si;
            while (read(sigfd, &si, sizeof si) > 0) {}
            int st;
            pid_t dead;
            while ((dead = waitpid(-1, &st, WNOHANG)) > 0) {
                if (dead == pid) {
                    status = exit_code(st);
                    kill(-1, SIGKILL); /* PID 1: every process but the agent */
                }
            }
        }
        for (int i = 2; i <= 3; i++) {
            if (!fds[i].revents) continue;
            int *fd = i == 2 ? &out : &err;
            ssize_t r = read(*fd, buf, sizeof buf);
            if (r > 0) {
                send_frame(i == 2 ? 'O' : 'R', buf, (uint32_t)r);
            } else if (r == 0 || errno != EINTR) {
                close(*fd);
                *fd = -1;
            }
        }
        if (fds[4].revents) {
            ssize_t w = write(in, pending, npending);
            if (w > 0) {
                memmove(pending, pending + w, npending - (size_t)w);
                npending -= (size_t)w;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                npending = 0; /* the workload closed its stdin */
            }
        }
        if (fds[0].revents) {
            char type;
            uint32_t n;
            char *payload = read_frame(&type, &n);
            if (type == 'I' && n == 0) {
                stdin_done = 1;
            } else if (type == 'I' && in >= 0) {
                pending = realloc(pending, npending + n);
                if (!pending) _exit(5);
                memcpy(pending + npending, payload, n);
                npending += n;
            } else if (type == 'W' && n == 4 && tty >= 0) {
                set_size(tty, (unsigned char *)payload);
            } else if (type == 'S' && n == 1) {
                kill(-pid, (unsigned char)payload[0]);
            } else if (type == 'K') {
                kill(-1, SIGKILL);
            }
            free(payload);
        }
        /* After the frame: an end of input that arrives once everything was written must close
         * the pipe now, or a workload waiting for it (say `tr`, which buffers) never wakes us. */
        if (in >= 0 && stdin_done && !npending) {
            close(in);
            in = -1;
        }
    }
    if (in >= 0) close(in);
    free(pending);
    sync(); /* the 9p mount caches writes (cache=loose): the host must see them at exit */
    uint32_t code = (uint32_t)status;
    char be[4] = {(char)(code >> 24), (char)(code >> 16), (char)(code >> 8), (char)code};
    send_frame('Q', be, 4);
}

/* ``size``: rows and columns for a terminal exec (T), NULL for pipes (X). */
static void run(char *payload, uint32_t n, int sigfd, const unsigned char *size) {
    char *end = payload + n, *p = payload;
    const char *cwd = p;
    p += strlen(p) + 1;
    int argc = atoi(p);
    p += strlen(p) + 1;
    char **argv = calloc((size_t)argc + 1, sizeof *argv);
    char **envp = calloc(n + 1, sizeof *envp);
    if (!argv || !envp || argc < 1) _exit(5);
    for (int i = 0; i < argc && p < end; i++, p += strlen(p) + 1) argv[i] = p;
    for (size_t i = 0; p < end; i++, p += strlen(p) + 1) envp[i] = p;
    int in[2], out[2], err[2], tty = -1;
    if (size) { /* the guest's own terminal: master here, the peer is all three streams */
        tty = open(ROOT "/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
        int unlock = 0;
        int peer = tty < 0 || ioctl(tty, TIOCSPTLCK, &unlock) ? -1 : ioctl(tty, TIOCGPTPEER, O_RDWR | O_NOCTTY);
        if (peer < 0) {
            if (tty >= 0) close(tty);
            free(argv);
            free(envp);
            return send_error("open a terminal", ROOT "/dev/pts/ptmx");
        }
        set_size(tty, size);
        in[0] = out[1] = err[1] = peer;
        in[1] = fcntl(tty, F_DUPFD_CLOEXEC, 0);
        out[0] = tty;
        err[0] = -1;
    } else if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        free(argv);
        free(envp);
        return send_error("pipe", "");
    }
    pid_t pid = fork();
    if (pid == 0) child(cwd, argv, envp, in[0], out[1], err[1]);
    close(in[0]);
    if (!size) {
        close(out[1]);
        close(err[1]);
    }
    free(argv);
    free(envp);
    if (pid < 0) {
        close(in[1]);
        close(out[0]);
        if (err[0] >= 0) close(err[0]);
        return send_error("fork", "");
    }
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    supervise(pid, sigfd, in[1], out[0], err[0], tty);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    port = open(argv[1], O_RDWR | O_CLOEXEC);
    if (port < 0) {
        perror(argv[1]);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    send_frame('H', NULL, 0);
    for (;;) {
        char type;
        uint32_t n;
        char *payload = read_frame(&type, &n);
        if (type == 'N') reseed(payload, n);
        else if (type == 'M') setup_root(payload, n);
        else if (type == 'X') run(payload, n, sigfd, NULL);
        else if (type == 'T' && n >= 4) run(payload + 4, n - 4, sigfd, (unsigned char *)payload);
        /* stdin, signals and kills arriving between execs belong to no workload */
        free(payload);
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
}
