/* corral-launch: the fork choreography of one process sandbox, in C.
 *
 *   caller ─spawn─► outer (C1) ──fork──► init (C2, PID 1) ──fork──► workload (C3) ─exec─► sh -c
 *                   joins cgroups,       builds the root,            setsid, stdio, cwd, rlimits,
 *                   unshares namespaces, prepares Landlock,          keyring, capabilities,
 *                   waits for network,   reaps orphans; or serves     Landlock, seccomp (last),
 *                   lifeline to caller   exec requests (long-lived)   execve
 *
 * Python plans everything (mount steps, Landlock masks, the seccomp BPF program, capability
 * bits) and hands it over as a record stream on a descriptor (argv[1]); this program only
 * applies it, so a sandbox costs a few system calls instead of three forks of a Python process.
 * Set-up failures travel back on the close-on-exec error pipe: EOF without data means the
 * workload exec'd. Usage: corral-launch SPEC_FD ERROR_FD. Records: one tag byte, a little-endian u32 length, the payload; fields of a
 * payload are separated by NUL bytes (see corral/native/records.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <grp.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* Landlock's uapi as of ABI 6+ (Debian 12's headers stop at ABI 2). */
struct ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
#define RULE_PATH_BENEATH 1

#define MAX_ITEMS 4096
#define MAX_CONNS 256
#define MAX_MESSAGE (256 * 1024)
#define OLD "/oldroot"
#define NEW "/newroot"
#define DENY_MARK "/.corral-denied"

struct mount_step {
    char kind; /* b bind, c copy, d deny, t tmpfs, s symlink */
    int readonly, is_dir;
    const char *path, *extra; /* extra: bind source or symlink target */
};

struct rule {
    uint64_t rights;
    const char *path;
};

struct spec {
    const char *argv[MAX_ITEMS + 1];
    int argc;
    const char *env[MAX_ITEMS + 1];
    int envc;
    const char *cwd;
    struct mount_step mounts[MAX_ITEMS];
    int nmounts;
    int userns;
    unsigned uid, gid;
    const char *cgroup_procs[16];
    int ncgroups;
    int ready_w, sync_r;
    int landlock;
    struct ruleset_attr ruleset;
    uint64_t file_rights;
    unsigned restrict_flags;
    struct rule rules[MAX_ITEMS];
    int nrules;
    struct sock_filter *bpf;
    unsigned short bpf_len;
    unsigned seccomp_flags;
    int drop_privileges;
    unsigned securebits;
    int last_cap;
    struct { int resource; rlim_t soft, hard; } rlimits[16];
    int nrlimits;
    int pty_slave;
    int stdio[3];
    int run_as;
    unsigned run_uid, run_gid;
    int join_keyring;
    int audit_session;
    int proxy_to; /* a unix socket: send it a listener on the new namespace's loopback */
    int control_fd;
    const char *detach_name;
    int detach;
    int keep[32];
    int nkeep;
    int error_w, lifeline_r;
    const char *hostname;
};

static int error_fd = -1;

/* Report a set-up failure to the caller and die (127, as the Python launcher did). */
static void die(const char *fmt, ...) {
    char message[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof message) n = sizeof message - 1;
    if (error_fd >= 0 && write(error_fd, message, n) < 0) { /* nothing left to tell */ }
    _exit(127);
}

#define CHECK(expr, ...) do { if ((expr) < 0) die(__VA_ARGS__); } while (0)

/* ---- records ------------------------------------------------------------------------------ */

/* A record stream being read; each payload is copied, NUL-terminated, to ``out`` (one block
 * of size + 1 bytes holds them all: a record's 5-byte header outweighs its NUL). */
struct cursor {
    const char *data;
    size_t size, at;
    char *out;
};

static struct cursor cursor_over(const char *data, size_t size) {
    struct cursor c = {data, size, 0, malloc(size + 1)};
    if (!c.out) die("out of memory");
    return c;
}

/* The next record: its tag, payload and length. 1: a record; 0: the end; -1: truncated. */
static int next_record(struct cursor *c, char *tag, char **payload, uint32_t *len) {
    if (c->at == c->size) return 0;
    if (c->size - c->at < 5) return -1;
    *tag = c->data[c->at];
    memcpy(len, c->data + c->at + 1, 4);
    if (c->size - c->at - 5 < *len) return -1;
    memcpy(c->out, c->data + c->at + 5, *len);
    c->out[*len] = 0;
    *payload = c->out;
    c->out += *len + 1;
    c->at += 5 + *len;
    return 1;
}

/* Split a payload at NULs into at most n fields; returns how many were present. */
static int fields(char *payload, uint32_t len, const char **out, int n) {
    int count = 0;
    size_t start = 0;
    for (size_t i = 0; i <= len && count < n; i++) {
        if (i == len || payload[i] == 0) {
            out[count++] = payload + start;
            start = i + 1;
        }
    }
    return count;
}

static long long number(const char *text) {
    char *end;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno || *end || end == text) die("malformed launch spec: %s is not a number", text);
    return value;
}

static unsigned long long unumber(const char *text) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || *end || end == text) die("malformed launch spec: %s is not a number", text);
    return value;
}

static char *read_fd(int fd, size_t *size) {
    size_t cap = 65536, used = 0;
    char *data = malloc(cap);
    if (!data) die("out of memory");
    for (;;) {
        if (used == cap) {
            cap *= 2;
            data = realloc(data, cap);
            if (!data) die("out of memory");
        }
        ssize_t n = read(fd, data + used, cap - used);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("read launch spec: %s", strerror(errno));
        if (n == 0) break;
        used += n;
    }
    *size = used;
    return data;
}

static void set_env(struct spec *s, const char *entry) {
    size_t key = strcspn(entry, "=");
    for (int i = 0; i < s->envc; i++)
        if (!strncmp(s->env[i], entry, key + 1)) { s->env[i] = entry; return; }
    if (s->envc == MAX_ITEMS) die("too many environment variables");
    s->env[s->envc++] = entry;
}

static void add_mount(struct spec *s, char kind, int readonly, int is_dir, const char *path,
                      const char *extra) {
    if (s->nmounts == MAX_ITEMS) die("too many mount steps");
    s->mounts[s->nmounts++] = (struct mount_step){kind, readonly, is_dir, path, extra};
}

/* Records shared by the launch spec and the sync message (network overrides). */
static void apply_record(struct spec *s, char tag, char *p, uint32_t len) {
    const char *f[6] = {0};
    int n = fields(p, len, f, 6);
    switch (tag) {
    case 'A':
        if (s->argc == MAX_ITEMS) die("too many arguments");
        s->argv[s->argc++] = p;
        break;
    case 'E': set_env(s, p); break;
    case 'C': s->cwd = p; break;
    case 'M':
        if (n < 4) die("malformed mount step");
        add_mount(s, f[0][0], strchr(f[1], 'r') != NULL, strchr(f[1], 'd') != NULL, f[2], f[3]);
        break;
    case 'B': /* a file bound over a path of the sandbox (network: the CA bundle) */
        if (n < 2) die("malformed bind");
        add_mount(s, 'b', 1, 0, f[1], f[0]);
        break;
    case 'U': s->userns = 1; s->uid = number(f[0]); s->gid = number(f[1]); break;
    case 'G':
        if (s->ncgroups == 16) die("too many cgroups");
        s->cgroup_procs[s->ncgroups++] = p;
        break;
    case 'N': s->ready_w = number(f[0]); s->sync_r = number(f[1]); break;
    case 'F':
        if (n < 5) die("malformed Landlock ruleset");
        s->landlock = 1;
        s->ruleset.handled_access_fs = unumber(f[0]);
        s->ruleset.handled_access_net = unumber(f[1]);
        s->ruleset.scoped = unumber(f[2]);
        s->file_rights = unumber(f[3]);
        s->restrict_flags = unumber(f[4]);
        break;
    case 'R':
        if (s->nrules == MAX_ITEMS) die("too many Landlock rules");
        s->rules[s->nrules++] = (struct rule){unumber(f[0]), f[1]};
        break;
    case 'S':
        if (len % sizeof(struct sock_filter) || len == 0 || len / sizeof(struct sock_filter) > 4096)
            die("not a seccomp BPF program: %u bytes", len);
        s->bpf = malloc(len); /* aligned, unlike a payload inside the cursor's block */
        if (!s->bpf) die("out of memory");
        memcpy(s->bpf, p, len);
        s->bpf_len = len / sizeof(struct sock_filter);
        break;
    case 's': s->seccomp_flags = unumber(f[0]); break;
    case 'P':
        s->drop_privileges = 1;
        s->securebits = unumber(f[0]);
        s->last_cap = number(f[1]);
        break;
    case 'L':
        if (s->nrlimits == 16) die("too many rlimits");
        s->rlimits[s->nrlimits].resource = number(f[0]);
        s->rlimits[s->nrlimits].soft = unumber(f[1]);
        s->rlimits[s->nrlimits].hard = unumber(f[2]);
        s->nrlimits++;
        break;
    case 'T': s->pty_slave = number(f[0]); break;
    case 'I': for (int i = 0; i < 3; i++) s->stdio[i] = number(f[i]); break;
    case 'W': s->run_as = 1; s->run_uid = number(f[0]); s->run_gid = number(f[1]); break;
    case 'K': s->join_keyring = 1; break;
    case 'a': s->audit_session = 1; break;
    case 'q': s->proxy_to = number(f[0]); break;
    case 'O': s->control_fd = number(f[0]); break;
    case 'D': s->detach = 1; s->detach_name = p; break;
    case 'X':
        if (s->nkeep == 32) die("too many kept descriptors");
        s->keep[s->nkeep++] = number(f[0]);
        break;
    case 'n': break; /* the caller's "network ready" marker */
    case 'l': s->lifeline_r = number(f[0]); break;
    case 'H': s->hostname = p; break;
    default: die("malformed launch spec: unknown record %c", tag);
    }
}

/* The launch spec and the caller's network message; their strings live as long as we do. */
static void parse_records(struct spec *s, const char *data, size_t size) {
    struct cursor c = cursor_over(data, size);
    char tag;
    char *payload;
    uint32_t len;
    int more;
    while ((more = next_record(&c, &tag, &payload, &len)) > 0) apply_record(s, tag, payload, len);
    if (more < 0) die("malformed launch spec: truncated record");
}

/* ---- small helpers ------------------------------------------------------------------------ */

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* Close every descriptor except ``keep`` (negative entries ignored). */
static void keep_only(int *keep, int n) {
    int sorted[64], m = 0;
    for (int i = 0; i < n && m < 64; i++)
        if (keep[i] >= 3) sorted[m++] = keep[i];
    qsort(sorted, m, sizeof(int), cmp_int);
    unsigned low = 3;
    for (int i = 0; i < m; i++) {
        if ((unsigned)sorted[i] > low) syscall(SYS_close_range, low, sorted[i] - 1, 0);
        if ((unsigned)sorted[i] >= low) low = sorted[i] + 1;
    }
    syscall(SYS_close_range, low, ~0U, 0);
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    CHECK(fd, "open %s: %s", path, strerror(errno));
    CHECK(write(fd, text, strlen(text)), "write %s: %s", path, strerror(errno));
    close(fd);
}

static void mkdirs(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) die("path too long: %s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, mode) < 0 && errno != EEXIST) die("mkdir %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, mode) < 0 && errno != EEXIST) die("mkdir %s: %s", buf, strerror(errno));
}

static void ensure_parent(const char *path) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    char *slash = strrchr(buf, '/');
    if (slash && slash != buf) {
        *slash = 0;
        mkdirs(buf, 0755);
    }
}

static void touch(const char *path, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, mode);
    CHECK(fd, "create %s: %s", path, strerror(errno));
    close(fd);
}

static void ensure_mountpoint(const char *target, int is_dir) {
    struct stat st;
    if (lstat(target, &st) == 0) return;
    if (is_dir) {
        mkdirs(target, 0755);
    } else {
        ensure_parent(target);
        touch(target, 0644);
    }
}

static void do_mount(const char *source, const char *target, const char *type,
                     unsigned long flags, const char *data) {
    CHECK(mount(source, target, type, flags, data), "mount %s on %s: %s", source ? source : "-",
          target, strerror(errno));
}

static void bind_mount(const char *source, const char *target, int readonly) {
    do_mount(source, target, NULL, MS_BIND | MS_REC, NULL);
    struct mount_attr attr = {
        .attr_set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (readonly ? MOUNT_ATTR_RDONLY : 0)};
    CHECK(syscall(SYS_mount_setattr, AT_FDCWD, target, AT_RECURSIVE, &attr, sizeof attr),
          "mount_setattr %s: %s", target, strerror(errno));
}

static void copy_file(const char *from, const char *to) {
    int in = open(from, O_RDONLY | O_CLOEXEC);
    CHECK(in, "open %s: %s", from, strerror(errno));
    int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    CHECK(out, "create %s: %s", to, strerror(errno));
    char buf[65536];
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        CHECK(write(out, buf, n), "write %s: %s", to, strerror(errno));
    CHECK(n, "read %s: %s", from, strerror(errno));
    close(in);
    close(out);
}

static int exit_code(int status) {
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* ---- the root ----------------------------------------------------------------------------- */

static void build_dev(void) {
    static const char *devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    const char *dev = NEW "/dev";
    char node[PATH_MAX], source[PATH_MAX];
    mkdirs(dev, 0755);
    do_mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755");
    for (size_t i = 0; i < sizeof devices / sizeof *devices; i++) {
        snprintf(node, sizeof node, "%s/%s", dev, devices[i]);
        snprintf(source, sizeof source, OLD "/dev/%s", devices[i]);
        touch(node, 0644);
        do_mount(source, node, NULL, MS_BIND, NULL);
    }
    CHECK(mkdir(NEW "/dev/pts", 0755), "mkdir /dev/pts: %s", strerror(errno));
    do_mount("devpts", NEW "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620");
    CHECK(symlink("pts/ptmx", NEW "/dev/ptmx"), "symlink /dev/ptmx: %s", strerror(errno));
    CHECK(mkdir(NEW "/dev/shm", 0755), "mkdir /dev/shm: %s", strerror(errno));
    do_mount("tmpfs", NEW "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    static const char *links[][2] = {{"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"},
                                     {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}};
    for (size_t i = 0; i < 4; i++) {
        snprintf(node, sizeof node, "%s/%s", dev, links[i][0]);
        CHECK(symlink(links[i][1], node), "symlink %s: %s", node, strerror(errno));
    }
    do_mount(NULL, dev, NULL, MS_REMOUNT | MS_NOSUID | MS_NOEXEC | MS_RDONLY, NULL);
}

/* Order as bubblewrap: a scratch tmpfs becomes the root so the host's tree is reachable under
 * /oldroot; the sandbox root is assembled under /newroot; /newroot is pivoted to / and the host
 * tree detached. Same steps as corral/backends/process/rootfs.py. */
static void build_root(struct spec *s) {
    char target[PATH_MAX], source[PATH_MAX];
    do_mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    do_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k");
    CHECK(mkdir("/tmp" OLD, 0755), "mkdir oldroot: %s", strerror(errno));
    CHECK(mkdir("/tmp" NEW, 0755), "mkdir newroot: %s", strerror(errno));
    CHECK(syscall(SYS_pivot_root, "/tmp", "/tmp" OLD), "pivot_root: %s", strerror(errno));
    CHECK(chdir("/"), "chdir /: %s", strerror(errno));
    do_mount("tmpfs", NEW, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    touch(DENY_MARK, 0);
    CHECK(chmod(DENY_MARK, 0), "chmod deny mark: %s", strerror(errno));
    CHECK(mkdir(DENY_MARK "-dir", 0), "mkdir deny mark: %s", strerror(errno));

    for (int i = 0; i < s->nmounts; i++) {
        struct mount_step *m = &s->mounts[i];
        if (snprintf(target, sizeof target, NEW "%s", m->path) >= (int)sizeof target)
            die("path too long: %s", m->path);
        switch (m->kind) {
        case 's':
            ensure_parent(target);
            CHECK(symlink(m->extra, target), "symlink %s: %s", m->path, strerror(errno));
            break;
        case 't':
            mkdirs(target, 0755);
            do_mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
            break;
        case 'c':
            ensure_parent(target);
            snprintf(source, sizeof source, OLD "%s", m->path);
            copy_file(source, target);
            break;
        case 'b':
            ensure_mountpoint(target, m->is_dir);
            snprintf(source, sizeof source, OLD "%s", m->extra[0] ? m->extra : m->path);
            bind_mount(source, target, m->readonly);
            break;
        case 'd':
            ensure_mountpoint(target, m->is_dir);
            bind_mount(m->is_dir ? DENY_MARK "-dir" : DENY_MARK, target, 1);
            break;
        default: die("unknown mount step %c", m->kind);
        }
    }
    build_dev();
    mkdirs(NEW "/proc", 0755);
    do_mount("proc", NEW "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    CHECK(umount2(OLD, MNT_DETACH), "umount oldroot: %s", strerror(errno));
    CHECK(chdir(NEW), "chdir newroot: %s", strerror(errno));
    CHECK(syscall(SYS_pivot_root, ".", "."), "pivot_root: %s", strerror(errno));
    CHECK(umount2(".", MNT_DETACH), "umount scratch: %s", strerror(errno));
    CHECK(chdir("/"), "chdir /: %s", strerror(errno));
    /* The assembled root holds only mount points: nothing may be created there. */
    do_mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
}

/* ---- Landlock, capabilities, seccomp ------------------------------------------------------ */

/* The ruleset is built inside the sandbox's own view, after the root is assembled. */
static int prepare_landlock(struct spec *s) {
    if (!s->landlock) return -1;
    int ruleset = syscall(SYS_landlock_create_ruleset, &s->ruleset, sizeof s->ruleset, 0);
    CHECK(ruleset, "Landlock refused to create a ruleset: %s", strerror(errno));
    for (int i = 0; i < s->nrules; i++) {
        int fd = open(s->rules[i].path, O_PATH | O_CLOEXEC);
        CHECK(fd, "cannot add a Landlock rule for %s: %s", s->rules[i].path, strerror(errno));
        struct stat st;
        CHECK(fstat(fd, &st), "stat %s: %s", s->rules[i].path, strerror(errno));
        struct path_beneath_attr rule = {
            .allowed_access = s->rules[i].rights & s->ruleset.handled_access_fs, .parent_fd = fd};
        if (!S_ISDIR(st.st_mode)) rule.allowed_access &= s->file_rights;
        CHECK(syscall(SYS_landlock_add_rule, ruleset, RULE_PATH_BENEATH, &rule, 0),
              "cannot add a Landlock rule for %s: %s", s->rules[i].path, strerror(errno));
        close(fd);
    }
    return ruleset;
}

static void drop_privileges(struct spec *s) {
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs: %s", strerror(errno));
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    CHECK(syscall(SYS_capget, &header, data), "capget: %s", strerror(errno));
    /* Without CAP_SETPCAP (an unprivileged caller outside a user namespace) the bounding set
     * and securebits cannot change; no_new_privs and empty sets keep exec from granting any. */
    if (data[0].effective & (1u << CAP_SETPCAP)) {
        CHECK(prctl(PR_SET_SECUREBITS, s->securebits, 0, 0, 0), "securebits: %s", strerror(errno));
        for (int cap = 0; cap <= s->last_cap; cap++)
            CHECK(prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capability %d: %s", cap,
                  strerror(errno));
    }
    CHECK(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient: %s", strerror(errno));
    memset(data, 0, sizeof data);
    header.version = _LINUX_CAPABILITY_VERSION_3;
    CHECK(syscall(SYS_capset, &header, data), "capset: %s", strerror(errno));
}

/* In a fresh child of init: become the workload and exec it. Never returns. */
static void exec_workload(struct spec *s, int landlock, int error_w) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    CHECK(setsid(), "setsid: %s", strerror(errno)); /* no TIOCSTI into the caller's terminal */
    int stdio[3] = {s->stdio[0], s->stdio[1], s->stdio[2]};
    if (s->pty_slave >= 0) {
        CHECK(ioctl(s->pty_slave, TIOCSCTTY, 0), "TIOCSCTTY: %s", strerror(errno));
        stdio[0] = stdio[1] = stdio[2] = s->pty_slave;
    }
    /* Move sources out of 0..2 first so one dup2 cannot clobber another's source. */
    for (int i = 0; i < 3; i++)
        if (stdio[i] >= 0 && stdio[i] < 3 && stdio[i] != i) {
            stdio[i] = fcntl(stdio[i], F_DUPFD_CLOEXEC, 3);
            CHECK(stdio[i], "dup: %s", strerror(errno));
        }
    for (int i = 0; i < 3; i++) {
        if (stdio[i] < 0) continue;
        if (stdio[i] != i) CHECK(dup2(stdio[i], i), "dup2: %s", strerror(errno));
        else fcntl(i, F_SETFD, 0);
    }
    int keep[2] = {error_w, landlock};
    keep_only(keep, 2);
    if (s->run_as) {
        CHECK(setgroups(0, NULL), "setgroups: %s", strerror(errno));
        CHECK(setresgid(s->run_gid, s->run_gid, s->run_gid), "setresgid: %s", strerror(errno));
        CHECK(setresuid(s->run_uid, s->run_uid, s->run_uid), "setresuid: %s", strerror(errno));
    }
    CHECK(chdir(s->cwd ? s->cwd : "/"), "[Errno %d] %s: '%s'", errno, strerror(errno), s->cwd);
    for (int i = 0; i < s->nrlimits; i++) {
        struct rlimit limit = {s->rlimits[i].soft, s->rlimits[i].hard};
        CHECK(setrlimit(s->rlimits[i].resource, &limit), "setrlimit: %s", strerror(errno));
    }
    /* The agent's own keyring: after the uid change (so it is the agent's), before seccomp
     * (whose default filter forbids keyctl). */
    if (s->join_keyring)
        CHECK(syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL),
              "keyctl(JOIN_SESSION_KEYRING): %s", strerror(errno));
    if (s->drop_privileges) drop_privileges(s);
    if (landlock >= 0) {
        CHECK(syscall(SYS_landlock_restrict_self, landlock, s->restrict_flags),
              "landlock_restrict_self: %s", strerror(errno));
        close(landlock);
    }
    if (s->bpf) { /* last: it may forbid what the steps above needed */
        struct sock_fprog prog = {s->bpf_len, s->bpf};
        CHECK(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, s->seccomp_flags, &prog),
              "seccomp: %s", strerror(errno));
    }
    s->argv[s->argc] = NULL;
    s->env[s->envc] = NULL;
    execve(s->argv[0], (char *const *)s->argv, (char *const *)s->env);
    die("[Errno %d] %s: '%s'", errno, strerror(errno), s->argv[0]);
}

/* ---- long-lived sandboxes: init serves exec requests -------------------------------------- */

struct conn {
    int fd;
    pid_t pid;
    long long deadline_ms; /* 0: none */
    int timed_out;
};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void reply(struct conn *c, const char *json) {
    send(c->fd, json, strlen(json), MSG_NOSIGNAL);
}

static void reply_error(struct conn *c, const char *message) {
    char out[8192];
    size_t n = snprintf(out, sizeof out, "{\"event\": \"error\", \"message\": \"");
    for (const unsigned char *p = (const unsigned char *)message; *p && n < sizeof out - 16; p++) {
        if (*p == '"' || *p == '\\') n += snprintf(out + n, sizeof out - n, "\\%c", *p);
        else if (*p < 0x20) n += snprintf(out + n, sizeof out - n, "\\u%04x", *p);
        else out[n++] = *p;
    }
    snprintf(out + n, sizeof out - n, "\"}");
    reply(c, out);
}

static void kill_group(pid_t pid) {
    if (pid > 0) kill(-pid, SIGKILL); /* the workload leads its own session (setsid) */
}

static void hang_up(struct conn *conns, int *n, int i) {
    kill_group(conns[i].pid); /* still reaped, just not reported */
    close(conns[i].fd);
    conns[i] = conns[--*n];
}

/* One exec request: records as in the launch spec (argv, env, cwd, timeout, pty). */
struct exec_request {
    char *strings; /* every field, NUL-terminated, in one block freed after the fork */
    int pty;
    long long timeout;
};

static const char *parse_exec(struct spec *s, struct exec_request *r, const char *data,
                              size_t size) {
    struct cursor c = {data, size, 0, malloc(size + 1)};
    if (!c.out) return "out of memory";
    r->strings = c.out;
    s->argc = s->envc = 0;
    s->cwd = NULL;
    char tag, *out;
    uint32_t len;
    int more;
    while ((more = next_record(&c, &tag, &out, &len)) > 0) {
        if (tag == 'A' && s->argc < MAX_ITEMS) s->argv[s->argc++] = out;
        else if (tag == 'E' && s->envc < MAX_ITEMS) s->env[s->envc++] = out;
        else if (tag == 'C') s->cwd = out;
        else if (tag == 't') r->timeout = atoll(out);
        else if (tag == 'p') r->pty = 1;
        else return "malformed exec request: unknown record";
    }
    if (more < 0) return "malformed exec request: truncated record";
    if (s->argc == 0 || !s->cwd) return "malformed exec request: no command or cwd";
    return NULL;
}

static void start_exec(struct spec *base, int landlock, struct conn *c, char *data, size_t size,
                       int *fds, int nfds, int listener, int sigfd) {
    static struct spec s; /* large: not on the stack */
    s = *base;
    struct exec_request r = {NULL, 0, 0};
    /* A malformed request is answered, never fatal: init must outlive its callers. */
    const char *problem = parse_exec(&s, &r, data, size);
    if (!problem && nfds != (r.pty ? 1 : 3)) problem = "exec needs 3 stdio fds or 1 pty";
    if (problem) {
        reply_error(c, problem);
        free(r.strings);
        return;
    }
    if (r.pty) {
        s.pty_slave = fds[0];
    } else {
        s.pty_slave = -1;
        for (int i = 0; i < 3; i++) s.stdio[i] = fds[i];
    }
    int pipefd[2] = {-1, -1};
    pid_t pid = -1;
    if (pipe2(pipefd, O_CLOEXEC) == 0 && (pid = fork()) == 0) {
        close(pipefd[0]);
        close(listener);
        close(sigfd);
        error_fd = pipefd[1];
        exec_workload(&s, landlock, pipefd[1]);
    }
    free(r.strings);
    if (pid < 0) {
        reply_error(c, strerror(errno));
        for (int i = 0; i < 2; i++)
            if (pipefd[i] >= 0) close(pipefd[i]);
        return;
    }
    close(pipefd[1]);
    char message[4096];
    ssize_t n, total = 0;
    while ((n = read(pipefd[0], message + total, sizeof message - 1 - total)) > 0) total += n;
    close(pipefd[0]);
    if (total > 0) {
        message[total] = 0;
        reply_error(c, message);
        return;
    }
    c->pid = pid;
    c->deadline_ms = r.timeout > 0 ? now_ms() + r.timeout : 0;
    c->timed_out = 0;
    char out[64];
    snprintf(out, sizeof out, "{\"event\": \"started\", \"pid\": %d}", pid);
    reply(c, out);
}

static int serve(struct spec *s, int landlock) {
    prctl(PR_SET_NAME, "corral-init", 0, 0, 0);
    int listener = s->control_fd;
    fcntl(listener, F_SETFL, O_NONBLOCK);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    CHECK(sigfd, "signalfd: %s", strerror(errno));
    close(error_fd); /* the sandbox is up: the caller stops waiting here */
    error_fd = -1;
    static struct conn conns[MAX_CONNS];
    static char buf[MAX_MESSAGE];
    int nconns = 0;
    struct pollfd pfds[MAX_CONNS + 2];
    for (;;) {
        long long wait = -1, now = now_ms();
        for (int i = 0; i < nconns; i++)
            if (conns[i].deadline_ms) {
                long long left = conns[i].deadline_ms - now;
                if (left < 0) left = 0;
                if (wait < 0 || left < wait) wait = left;
            }
        pfds[0] = (struct pollfd){listener, nconns < MAX_CONNS ? POLLIN : 0, 0};
        pfds[1] = (struct pollfd){sigfd, POLLIN, 0};
        for (int i = 0; i < nconns; i++) pfds[i + 2] = (struct pollfd){conns[i].fd, POLLIN, 0};
        int polled = nconns;
        if (poll(pfds, polled + 2, wait) < 0 && errno != EINTR) return 125;
        if (pfds[1].revents) { /* reap every child; report the ones a caller waits for */
            struct signalfd_siginfo info;
            while (read(sigfd, &info, sizeof info) > 0) {}
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
                for (int i = 0; i < nconns; i++)
                    if (conns[i].pid == pid) {
                        char out[96];
                        snprintf(out, sizeof out,
                                 "{\"event\": \"exit\", \"code\": %d, \"timedOut\": %s}",
                                 exit_code(status), conns[i].timed_out ? "true" : "false");
                        reply(&conns[i], out);
                        conns[i].pid = 0;
                        conns[i].deadline_ms = 0;
                    }
        }
        for (int i = polled - 1; i >= 0; i--) {
            if (!pfds[i + 2].revents) continue;
            struct conn *c = &conns[i];
            int fds[3], nfds = 0;
            char control[CMSG_SPACE(sizeof fds)];
            struct iovec iov = {buf, sizeof buf};
            struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                                 .msg_controllen = sizeof control};
            ssize_t n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h))
                if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
                    int count = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                    for (int k = 0; k < count; k++) {
                        int fd;
                        memcpy(&fd, CMSG_DATA(h) + k * sizeof(int), sizeof fd);
                        if (nfds < 3) fds[nfds++] = fd;
                        else close(fd);
                    }
                }
            if (n <= 0) {
                hang_up(conns, &nconns, i);
            } else if (n == 5 && buf[0] == 'k') {
                kill_group(c->pid);
            } else if (!c->pid) {
                start_exec(s, landlock, c, buf, n, fds, nfds, listener, sigfd);
            }
            for (int k = 0; k < nfds; k++) close(fds[k]);
        }
        if (pfds[0].revents) {
            int fd;
            while (nconns < MAX_CONNS && (fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC)) >= 0)
                conns[nconns++] = (struct conn){fd, 0, 0, 0};
        }
        now = now_ms();
        for (int i = 0; i < nconns; i++)
            if (conns[i].deadline_ms && now >= conns[i].deadline_ms) {
                conns[i].timed_out = 1;
                conns[i].deadline_ms = 0;
                kill_group(conns[i].pid);
            }
    }
}

/* ---- the three processes ------------------------------------------------------------------ */

static int init_main(struct spec *s, int alive_r) {
    /* SIGKILL when the outer process dies; alive_r is readable (EOF) if it already did. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    struct pollfd alive = {alive_r, POLLIN, 0};
    if (poll(&alive, 1, 0) > 0) _exit(137);
    close(alive_r);
    prctl(PR_SET_NAME, "corral-init", 0, 0, 0);
    /* Init is neither Landlocked nor filtered: no workload may ptrace it or read its memory. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    build_root(s);
    int landlock = prepare_landlock(s);
    if (s->control_fd >= 0) return serve(s, landlock);
    pid_t workload = fork();
    CHECK(workload, "fork: %s", strerror(errno));
    if (workload == 0) exec_workload(s, landlock, error_fd);
    close(error_fd);
    error_fd = -1;
    if (landlock >= 0) close(landlock);
    for (int i = 0; i < 3; i++)
        if (s->stdio[i] >= 0) close(s->stdio[i]);
    if (s->pty_slave >= 0) close(s->pty_slave);
    /* PID 1: reap every orphan; leave with the workload's own status. */
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) return 125;
        if (pid == workload) return exit_code(status);
    }
}

static void loopback_up(void) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    CHECK(fd, "socket: %s", strerror(errno));
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    CHECK(ioctl(fd, SIOCGIFFLAGS, &ifr), "SIOCGIFFLAGS: %s", strerror(errno));
    ifr.ifr_flags |= IFF_UP;
    CHECK(ioctl(fd, SIOCSIFFLAGS, &ifr), "SIOCSIFFLAGS: %s", strerror(errno));
    close(fd);
}

/* The policy proxy's listening socket, made here on the new network namespace's loopback:
 * the workload reaches the proxy (a thread of the caller) without user-mode networking. */
static void send_proxy_listener(int to) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd, "proxy socket: %s", strerror(errno));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(fd, (struct sockaddr *)&addr, sizeof addr), "proxy bind: %s", strerror(errno));
    CHECK(listen(fd, 128), "proxy listen: %s", strerror(errno));
    char control[CMSG_SPACE(sizeof fd)] = {0};
    char byte = 'L';
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof fd);
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
    CHECK(sendmsg(to, &msg, MSG_NOSIGNAL), "proxy listener: %s", strerror(errno));
    close(fd);
    close(to);
}

/* Wait for init; if the caller dies (lifeline EOF), kill the sandbox. */
static int supervise(pid_t init, int lifeline_r) {
    int pidfd = syscall(SYS_pidfd_open, init, 0);
    CHECK(pidfd, "pidfd_open: %s", strerror(errno));
    struct pollfd watched[2] = {{pidfd, POLLIN, 0}, {lifeline_r, POLLIN, 0}};
    for (;;) {
        int n = poll(watched, lifeline_r >= 0 ? 2 : 1, -1);
        if (n < 0 && errno == EINTR) continue;
        if (lifeline_r >= 0 && watched[1].revents) kill(init, SIGKILL); /* empties the PID ns */
        int status;
        if (waitpid(init, &status, 0) == init) return exit_code(status);
        return 125;
    }
}

/* Writing loginuid (CAP_AUDIT_CONTROL) starts a new audit session: every record of the
 * sandbox's processes then carries its number, also after they exited, which is how
 * corral.audit.kernel_denials tells them from the host's. The login uid itself is kept. Best
 * effort: where it is immutable, records are told apart by PID namespace instead. */
static void new_audit_session(void) {
    char value[32] = {0};
    int fd = open("/proc/self/loginuid", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, value, sizeof value - 1);
    close(fd);
    if (n <= 0 || strtoul(value, NULL, 10) == 4294967295UL)
        snprintf(value, sizeof value, "%u", getuid());
    fd = open("/proc/self/loginuid", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    if (write(fd, value, strlen(value)) < 0) { /* immutable: the namespace tells instead */ }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "corral-launch is started by Corral's process backend, not by hand\n");
        return 2;
    }
    static struct spec s;
    s.ready_w = s.sync_r = s.control_fd = s.pty_slave = s.error_w = s.lifeline_r = -1;
    s.proxy_to = -1;
    s.stdio[0] = s.stdio[1] = s.stdio[2] = -1;
    int spec_fd = atoi(argv[1]);
    error_fd = atoi(argv[2]); /* first: even a malformed spec must be reported */
    /* spawn cleared close-on-exec to hand it over; the workload's exec must close it. */
    if (fcntl(error_fd, F_SETFD, FD_CLOEXEC) < 0) return 127;
    size_t size;
    char *data = read_fd(spec_fd, &size);
    close(spec_fd);
    parse_records(&s, data, size);
    s.error_w = error_fd;
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    int keep[48], nkeep = 0;
    int singles[] = {s.error_w,  s.lifeline_r, s.ready_w,    s.sync_r,  s.stdio[0],
                     s.stdio[1], s.stdio[2],   s.pty_slave,  s.control_fd, s.proxy_to};
    for (size_t i = 0; i < sizeof singles / sizeof *singles; i++) keep[nkeep++] = singles[i];
    for (int i = 0; i < s.nkeep; i++) keep[nkeep++] = s.keep[i];
    keep_only(keep, nkeep);
    int lifeline = s.lifeline_r;
    if (s.detach) { /* outlive the caller: own session, no lifeline, stdio on /dev/null */
        setsid();
        close(s.lifeline_r);
        lifeline = -1;
        int null = open("/dev/null", O_RDWR);
        for (int i = 0; i < 3; i++) dup2(null, i);
        if (null > 2) close(null);
        if (s.detach_name[0]) prctl(PR_SET_NAME, s.detach_name, 0, 0, 0);
    }
    if (s.audit_session) new_audit_session();
    char pid[32];
    snprintf(pid, sizeof pid, "%d", getpid());
    for (int i = 0; i < s.ncgroups; i++) write_file(s.cgroup_procs[i], pid); /* before any ns */
    if (s.userns) {
        char map[64];
        CHECK(unshare(CLONE_NEWUSER), "unshare(user): %s", strerror(errno));
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", s.uid, s.uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1", s.gid, s.gid);
        write_file("/proc/self/gid_map", map);
    }
    CHECK(unshare(CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID |
                  CLONE_NEWNET),
          "unshare: %s", strerror(errno));
    const char *host = s.hostname ? s.hostname : "corral";
    CHECK(sethostname(host, strlen(host)), "sethostname: %s", strerror(errno));
    loopback_up();
    if (s.proxy_to >= 0) send_proxy_listener(s.proxy_to);
    if (s.ready_w >= 0) { /* the caller wires the network namespace, then sends overrides */
        CHECK(write(s.ready_w, "R", 1), "ready: %s", strerror(errno));
        close(s.ready_w);
        size_t n;
        char *overrides = read_fd(s.sync_r, &n);
        close(s.sync_r);
        if (n == 0) return 125; /* the caller gave up (and reported why) */
        parse_records(&s, overrides, n);
    }
    int alive[2];
    CHECK(pipe2(alive, O_CLOEXEC), "pipe: %s", strerror(errno));
    pid_t init = fork();
    CHECK(init, "fork: %s", strerror(errno));
    if (init == 0) {
        close(alive[1]);
        _exit(init_main(&s, alive[0]));
    }
    close(alive[0]);
    close(s.error_w);
    error_fd = -1;
    for (int i = 0; i < 3; i++)
        if (s.stdio[i] > 2) close(s.stdio[i]);
    if (s.pty_slave > 2) close(s.pty_slave);
    return supervise(init, lifeline);
}
