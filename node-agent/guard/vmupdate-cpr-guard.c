/*
 * vmupdate-cpr-guard: makes a QEMU cpr-exec update survivable.
 *
 * QEMU (>= 11) in cpr-exec mode exec()s `cpr-exec-command` in its own pid with the
 * preserved fds (guest RAM memfd, aux ROM memfds, the CPR state memfd whose number is in
 * $QEMU_CPR_EXEC_STATE) left open.  The agent sets that command to
 *
 *   vmupdate-cpr-guard --status FILE --commit FIFO [--commit-timeout SEC] [--log FILE]
 *                      [--old-argc N] [--sigmask HEX] -- OLD_BINARY OLD_ARGS... -incoming URI
 *                                     -- NEW_BINARY NEW_ARGS...
 *
 * The guard (still pid P) starts a watcher by double fork (never a child of QEMU), waits
 * until the watcher is ready, then execs the new QEMU in pid P.  The watcher polls a
 * pidfd of P and the commit FIFO:
 *   "commit\n"            -> status "committed", the watcher exits (drops its fd copies);
 *   P exits before commit -> rewind the state memfd, exec the OLD argv in the watcher's pid
 *                            (same fd numbers, same environment): the VM comes back;
 *   timeout or "abort\n"  -> SIGKILL P through the pidfd, wait for it, roll back as above.
 * Before a rollback it decides on its own, the watcher stops P and reads the FIFO to its
 * end: a commit found there wins (the agent does not wait for its commit to be taken).
 * If the watcher cannot be started, or the new binary cannot be exec'd, the guard execs
 * the OLD argv in pid P itself (the update fails safe).  See README.md for the protocol.
 *
 * Everything the guard opens is O_CLOEXEC: the new and the old QEMU see exactly the fds
 * and the environment that QEMU handed over.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef GUARD_VERSION
#define GUARD_VERSION "dev"
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* PIDFD_GET_INFO (Linux >= 6.13; exit info >= 6.15), defined here for older headers. */
struct guard_pidfd_info {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
};
#define GUARD_PIDFD_GET_INFO _IOWR(0xFF, 11, struct guard_pidfd_info)
#define GUARD_PIDFD_INFO_EXIT (1ULL << 3)

#define STATE_ENV "QEMU_CPR_EXEC_STATE"

extern char **environ;

/* ------------------------------------------------------------------ configuration */

static const char *opt_status;
static const char *opt_commit;
static const char *opt_log;
static double opt_timeout = 30.0;
static char **old_argv;
static char **new_argv;
static int state_fd = -1;
/* The agent driving the update: when it dies, nobody will commit or resume. */
static pid_t opt_agent_pid;
static unsigned long long opt_agent_start;
static int agent_fd = -1;
/* The VM's QMP socket: after a commit, the watcher resumes the guest if the agent died
 * before it could. */
static const char *opt_qmp;
/* --seize: see seize_main() */
static int opt_seize;
static char **p_env;
/* The signal mask of QEMU's main thread (--sigmask, hex as in /proc/PID/status SigBlk): every
 * program the guard execs starts with it. QEMU may run cpr-exec-command from any thread that
 * holds its big lock, and its other threads block every signal: an exec from one of them
 * would start the new QEMU (or the rolled-back old one) deaf to SIGTERM. */
static uint64_t opt_sigmask;
static int have_sigmask;
static void restore_p(void);

/* ------------------------------------------------------------------ status record */

static struct {
    const char *phase;
    const char *reason;
    pid_t qemu_pid, guard_pid, watcher_pid;
    int64_t t_guard, t_ready, t_exec_new, t_event, t_kill, t_rollback, t_commit, deadline;
    int64_t t_agent_gone, t_resumed;
    int new_execed;
    int have_exit;
    int exit_status;
    char error[512];
} st;

static int log_fd = -1;

static int64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* stderr (inherited from QEMU) and the optional log file. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n = snprintf(line, sizeof(line), "vmupdate-cpr-guard[%d]: ", (int)getpid());
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    write_all(2, line, (size_t)n);
    if (log_fd >= 0) {
        char pre[32];
        int m = snprintf(pre, sizeof(pre), "%lld ", (long long)now_ns(CLOCK_REALTIME));
        char both[1100];
        memcpy(both, pre, (size_t)m);
        memcpy(both + m, line, (size_t)n);
        write_all(log_fd, both, (size_t)(m + n));
    }
}

/* --log FILE, appended to; a log that cannot be opened is said on stderr and done without. */
static void open_log(void)
{
    if (!opt_log)
        return;
    log_fd = open(opt_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0)
        say("cannot open log %s: %s (continuing)", opt_log, strerror(errno));
}

static void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st.error, sizeof(st.error), fmt, ap);
    va_end(ap);
    say("%s", st.error);
}

struct buf {
    char d[4096];
    size_t n;
};

static void bput(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bput(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    if (b->n >= sizeof(b->d) - 1)
        return;
    va_start(ap, fmt);
    int n = vsnprintf(b->d + b->n, sizeof(b->d) - b->n, fmt, ap);
    va_end(ap);
    if (n > 0)
        b->n += (size_t)n;
    if (b->n > sizeof(b->d) - 1)
        b->n = sizeof(b->d) - 1;
}

static void bstr(struct buf *b, const char *key, const char *s)
{
    bput(b, ",\"%s\":", key);
    if (!s || !*s) {
        bput(b, "null");
        return;
    }
    bput(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            bput(b, "\\%c", c);
        else if (c < 0x20)
            bput(b, "\\u%04x", c);
        else
            bput(b, "%c", c);
    }
    bput(b, "\"");
}

static void bts(struct buf *b, const char *key, int64_t t)
{
    if (t)
        bput(b, ",\"%s\":%lld", key, (long long)t);
    else
        bput(b, ",\"%s\":null", key);
}

static void bpid(struct buf *b, const char *key, pid_t p)
{
    if (p > 0)
        bput(b, ",\"%s\":%d", key, (int)p);
    else
        bput(b, ",\"%s\":null", key);
}

static int write_buf(struct buf *b);

/* Atomic: write "<status>.<pid>.tmp", then rename over the status file. */
static int write_status(void)
{
    struct buf b;
    b.n = 0;
    bput(&b, "{\"version\":1");
    bstr(&b, "phase", st.phase);
    bstr(&b, "reason", st.reason);
    bpid(&b, "qemu_pid", st.qemu_pid);
    bpid(&b, "guard_pid", st.guard_pid);
    bpid(&b, "watcher_pid", st.watcher_pid);
    if (state_fd >= 0)
        bput(&b, ",\"state_fd\":%d", state_fd);
    else
        bput(&b, ",\"state_fd\":null");
    bput(&b, ",\"new_execed\":%s", st.new_execed ? "true" : "false");
    if (!st.have_exit)
        bput(&b, ",\"new_exit\":null");
    else if (WIFSIGNALED(st.exit_status))
        bput(&b, ",\"new_exit\":{\"wait_status\":%d,\"signal\":%d}", st.exit_status,
             WTERMSIG(st.exit_status));
    else
        bput(&b, ",\"new_exit\":{\"wait_status\":%d,\"code\":%d}", st.exit_status,
             WEXITSTATUS(st.exit_status));
    bput(&b, ",\"commit_timeout_ms\":%lld", (long long)(opt_timeout * 1000.0));
    bts(&b, "t_guard_ns", st.t_guard);
    bts(&b, "t_ready_ns", st.t_ready);
    bts(&b, "t_exec_new_ns", st.t_exec_new);
    bts(&b, "deadline_ns", st.deadline);
    bts(&b, "t_event_ns", st.t_event);
    bts(&b, "t_kill_ns", st.t_kill);
    bts(&b, "t_commit_ns", st.t_commit);
    bts(&b, "t_rollback_ns", st.t_rollback);
    bstr(&b, "error", st.error);
    bts(&b, "t_agent_gone_ns", st.t_agent_gone);
    bts(&b, "t_resumed_ns", st.t_resumed);
    bput(&b, "}\n");
    return write_buf(&b);
}

static int write_buf(struct buf *b)
{
    if (!opt_status)
        return -1;
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.%d.tmp", opt_status, (int)getpid()) >= (int)sizeof(tmp))
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
        say("cannot write status %s: %s", tmp, strerror(errno));
        return -1;
    }
    write_all(fd, b->d, b->n);
    close(fd);
    if (rename(tmp, opt_status) < 0) {
        say("cannot rename status to %s: %s", opt_status, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ exec of the old QEMU */

static void rewind_state(void)
{
    /* The file offset is shared with the process that read the state: rewind it.
     * (QEMU >= 11 also seeks to 0 on load; older or patched builds may not.) */
    if (state_fd >= 0 && lseek(state_fd, 0, SEEK_SET) < 0)
        say("cannot rewind CPR state fd %d: %s", state_fd, strerror(errno));
}

/* The kernel's own mask, exactly as given: glibc's sigprocmask would drop the two signals it
 * keeps for itself. */
static void apply_sigmask(void)
{
    if (!have_sigmask)
        return;
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &opt_sigmask, NULL, sizeof(opt_sigmask)) < 0)
        say("cannot set signal mask %016llx: %s", (unsigned long long)opt_sigmask,
            strerror(errno));
    else
        say("signal mask %016llx", (unsigned long long)opt_sigmask);
}

/* Exec the old QEMU with the old argv in the calling process; returns only on failure,
 * after recording "rollback-failed". */
static void exec_old(const char *reason)
{
    rewind_state();
    st.phase = "rolled-back";
    st.reason = reason;
    st.qemu_pid = getpid();
    st.t_rollback = now_ns(CLOCK_REALTIME);
    write_status();
    say("rolling back (%s): exec %s in pid %d", reason, old_argv[0], (int)getpid());
    if (opt_seize)
        restore_p();
    apply_sigmask();
    execve(old_argv[0], old_argv, opt_seize && p_env ? p_env : environ);
    int e = errno;
    st.phase = "rollback-failed";
    st.qemu_pid = 0;
    char prev[sizeof(st.error)];
    snprintf(prev, sizeof(prev), "%s", st.error);
    set_error("%s%sexecve %s: %s", prev, *prev ? "; " : "", old_argv[0], strerror(e));
    write_status();
}

/* ------------------------------------------------------------------ the watcher */

static ssize_t read_ex(int ex_rd);
static int ex_fd = -1;
static int pidfd = -1;
static int fifo_rd = -1, fifo_wr = -1;
static int created_fifo;
static unsigned long long p_starttime;

static int read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n;
    do
        n = read(fd, buf, cap - 1);
    while (n < 0 && errno == EINTR);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return (int)n;
}

/* Fields of /proc/<pid>/stat after the comm; field numbers as in proc(5). */
static int stat_fields(pid_t pid, char *state, unsigned long long *start, int *exit_code)
{
    char path[64], buf[2048];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if (read_small(path, buf, sizeof(buf)) < 0)
        return -1;
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -1;
    p += 2; /* field 3 */
    *state = *p;
    int field = 3;
    *exit_code = -1;
    *start = 0;
    while (*p) {
        if (*p == ' ') {
            field++;
            if (field == 22)
                *start = strtoull(p + 1, NULL, 10);
            if (field == 52)
                *exit_code = atoi(p + 1);
        }
        p++;
    }
    return 0;
}

/* A pidfd on `pid` if it is still the process that started at `start` (clock ticks since
 * boot, /proc/<pid>/stat field 22; 0: do not check), else -1. */
static int open_pid(pid_t pid, unsigned long long start)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0)
        return -1;
    char state;
    unsigned long long s;
    int code;
    if (stat_fields(pid, &state, &s, &code) == 0 &&
        ((start && s != start) || state == 'Z' || state == 'X')) {
        close(fd);
        errno = ESRCH;
        return -1;
    }
    return fd;
}

static int pid_gone(int pfd)
{
    struct pollfd p = {.fd = pfd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

static int wait_pidfd(int pfd, int ms)
{
    struct pollfd p = {.fd = pfd, .events = POLLIN};
    int r;
    do
        r = poll(&p, 1, ms);
    while (r < 0 && errno == EINTR);
    return r > 0;
}

/* ------------------------------------------------------------------ a minimal QMP client */

static int64_t mono_ms(void)
{
    return now_ns(CLOCK_MONOTONIC) / 1000000;
}

struct qmp {
    int fd;
    pid_t peer;
    size_t n;
    char buf[65536];
};
static char qline[65536];

/* One line of the peer's output into qline; -1 on EOF, error or timeout. */
static int qmp_line(struct qmp *q, int64_t deadline)
{
    for (;;) {
        char *nl = memchr(q->buf, '\n', q->n);
        if (nl) {
            size_t len = (size_t)(nl - q->buf);
            memcpy(qline, q->buf, len);
            qline[len] = 0;
            memmove(q->buf, nl + 1, q->n - len - 1);
            q->n -= len + 1;
            return (int)len;
        }
        if (q->n == sizeof(q->buf))
            q->n = 0; /* a line longer than we care about */
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = {.fd = q->fd, .events = POLLIN};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        ssize_t k = read(q->fd, q->buf + q->n, sizeof(q->buf) - q->n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        q->n += (size_t)k;
    }
}

/* Send one command; 0: {"return"...} (in qline), 1: {"error"...}, -1: no answer. Events
 * in between are skipped. */
static int qmp_cmd(struct qmp *q, const char *cmd, int ms)
{
    int64_t deadline = mono_ms() + ms;
    write_all(q->fd, cmd, strlen(cmd));
    write_all(q->fd, "\n", 1);
    while (qmp_line(q, deadline) >= 0) {
        if (!strncmp(qline, "{\"return\"", 9))
            return 0;
        if (!strncmp(qline, "{\"error\"", 8)) {
            say("QMP %s: %.300s", cmd, qline);
            return 1;
        }
    }
    return -1;
}

static void qmp_close(struct qmp *q)
{
    if (q->fd >= 0)
        close(q->fd);
    q->fd = -1;
}

static int qmp_open(struct qmp *q, const char *path, int ms)
{
    q->fd = -1;
    q->n = 0;
    q->peer = 0;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(a.sun_path))
        return -1;
    strcpy(a.sun_path, path);
    q->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (q->fd < 0)
        return -1;
    if (connect(q->fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        qmp_close(q);
        return -1;
    }
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(q->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
        q->peer = cred.pid;
    /* The greeting, then capabilities negotiation. */
    if (qmp_line(q, mono_ms() + ms) < 0 || strncmp(qline, "{\"QMP\"", 6) ||
        qmp_cmd(q, "{\"execute\":\"qmp_capabilities\"}", ms) != 0) {
        qmp_close(q);
        return -1;
    }
    return 0;
}

/* The string value of the first "key" in qline ("" if none). */
static void json_str(const char *key, char *out, size_t cap)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    out[0] = 0;
    const char *p = strstr(qline, pat);
    if (!p)
        return;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    if (*p++ != ':')
        return;
    while (*p == ' ')
        p++;
    if (*p++ != '"')
        return;
    size_t i = 0;
    while (*p && *p != '"' && i + 1 < cap)
        out[i++] = *p++;
    out[i] = 0;
}

/* query-status and query-migrate of the QEMU behind q. */
static int qmp_state(struct qmp *q, char *run, char *mig, size_t cap)
{
    if (qmp_cmd(q, "{\"execute\":\"query-status\"}", 3000) != 0)
        return -1;
    json_str("status", run, cap);
    if (qmp_cmd(q, "{\"execute\":\"query-migrate\"}", 3000) != 0)
        return -1;
    json_str("status", mig, cap);
    if (!*mig)
        snprintf(mig, cap, "none");
    return 0;
}

static int continuable(const char *run)
{
    return !strcmp(run, "paused") || !strcmp(run, "postmigrate") ||
           !strcmp(run, "prelaunch") || !strcmp(run, "finish-migrate");
}

/* SIGKILL every process but us whose command line contains `marker` (a path unique to
 * one operation); wait until they are gone. */
static void kill_marked(const char *marker)
{
    DIR *d = opendir("/proc");
    if (!d)
        return;
    static char cmd[65536];
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0 || pid == getpid())
            continue;
        char path[64];
        snprintf(path, sizeof(path), "/proc/%ld/cmdline", pid);
        int n = read_small(path, cmd, sizeof(cmd));
        int hit = 0;
        for (int i = 0; i < n && !hit; i += (int)strlen(cmd + i) + 1)
            hit = strstr(cmd + i, marker) != NULL;
        if (!hit)
            continue;
        int pfd = open_pid((pid_t)pid, 0);
        if (pfd < 0)
            continue;
        say("killing pid %ld (%s)", pid, marker);
        syscall(SYS_pidfd_send_signal, pfd, SIGKILL, NULL, 0);
        wait_pidfd(pfd, 10000);
        close(pfd);
    }
    closedir(d);
}

/* cont the QEMU at `path` unless it runs already; 0 when the guest runs. */
static int resume_at(const char *path)
{
    struct qmp q;
    char run[64], mig[64];
    if (qmp_open(&q, path, 2000) < 0)
        return -1;
    int rc = -1;
    if (qmp_state(&q, run, mig, sizeof(run)) == 0) {
        if (!strcmp(run, "running"))
            rc = 0;
        else if (continuable(run) && qmp_cmd(&q, "{\"execute\":\"cont\"}", 3000) == 0)
            rc = 0;
    }
    qmp_close(&q);
    return rc;
}

/* Best effort: the watcher is not the parent, so it cannot wait(). */
static void collect_exit(void)
{
    for (int i = 0; i < 3 && !st.have_exit; i++) {
        struct guard_pidfd_info info;
        memset(&info, 0, sizeof(info));
        info.mask = GUARD_PIDFD_INFO_EXIT;
        if (ioctl(pidfd, GUARD_PIDFD_GET_INFO, &info) == 0 && (info.mask & GUARD_PIDFD_INFO_EXIT)) {
            st.have_exit = 1;
            st.exit_status = info.exit_code;
            break;
        }
        char state;
        unsigned long long start;
        int code;
        if (stat_fields(st.guard_pid, &state, &start, &code) == 0 && start == p_starttime &&
            (state == 'Z' || state == 'X') && code >= 0) {
            st.have_exit = 1;
            st.exit_status = code;
            break;
        }
        sched_yield();
    }
}

static void finish_fifo(void)
{
    /* The FIFO lives as long as the watcher watches: a writer that gets ENXIO/ENOENT
     * knows nobody is listening. */
    if (opt_commit)
        unlink(opt_commit);
}

static void rollback(const char *reason) __attribute__((noreturn));
static void rollback(const char *reason)
{
    finish_fifo();
    exec_old(reason);
    _exit(1);
}

static void wait_dead(void)
{
    struct pollfd pf = {.fd = pidfd, .events = POLLIN};
    int waited = 0;
    for (;;) {
        int r = poll(&pf, 1, 5000);
        if (r > 0)
            return;
        if (r < 0 && errno != EINTR) {
            set_error("poll(pidfd): %s", strerror(errno));
            return;
        }
        if (r == 0)
            say("still waiting for pid %d to die (%d s)", (int)st.guard_pid, waited += 5);
    }
}

static void kill_and_rollback(const char *reason) __attribute__((noreturn));
static void kill_and_rollback(const char *reason)
{
    /* Never kill a guard that is falling back to the old argv in its own pid. */
    struct pollfd xp = {.fd = ex_fd, .events = POLLIN};
    while (ex_fd >= 0 && poll(&xp, 1, 0) > 0 && read_ex(ex_fd) > 0)
        ;
    st.phase = "rolling-back";
    st.reason = reason;
    st.t_kill = now_ns(CLOCK_REALTIME);
    write_status();
    say("%s: killing pid %d (not committed)", reason, (int)st.guard_pid);
    if (syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0) < 0 && errno != ESRCH)
        set_error("pidfd_send_signal: %s", strerror(errno));
    wait_dead();
    st.t_event = now_ns(CLOCK_REALTIME);
    collect_exit();
    rollback(reason);
}

/* 1 "commit", 2 "abort", 3 "resumed" or "done", 0 anything else. */
static int message_code(const char *word)
{
    if (!strcmp(word, "commit"))
        return 1;
    if (!strcmp(word, "abort"))
        return 2;
    if (!strcmp(word, "resumed") || !strcmp(word, "done"))
        return 3;
    return 0;
}

/* The next message from the FIFO (see message_code), 0 when no whole one is left. One per
 * call: what follows it stays in `acc` for the next call, because the agent does not wait
 * for its commit to be taken, so "commit" and "resumed" may be read together. */
static int next_message(char *acc, size_t *acc_n, size_t cap)
{
    for (;;) {
        char *nl;
        while ((nl = memchr(acc, '\n', *acc_n))) {
            *nl = 0;
            int what = message_code(acc);
            if (!what && *acc)
                say("ignoring unknown commit message '%.40s'", acc);
            size_t used = (size_t)(nl - acc) + 1;
            memmove(acc, nl + 1, *acc_n - used);
            *acc_n -= used;
            acc[*acc_n] = 0;
            if (what)
                return what;
        }
        if (*acc_n >= cap - 1)
            *acc_n = 0; /* garbage without a newline: drop */
        ssize_t n = read(fifo_rd, acc + *acc_n, cap - 1 - *acc_n);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        *acc_n += (size_t)n;
        acc[*acc_n] = 0;
    }
    /* A last word without its newline (a writer using `echo -n`). */
    int what = message_code(acc);
    if (what) {
        *acc_n = 0;
        acc[0] = 0;
    }
    return what;
}

/* Guard -> watcher messages: 'X' + 8-byte exec timestamp (written just before the exec of
 * the new QEMU; the pipe then hits EOF when the exec succeeded), or 'F' if the guard falls
 * back to the old argv in its own pid (the watcher must then stand down). Writes are
 * atomic (< PIPE_BUF). */
static ssize_t read_ex(int ex_rd)
{
    char m[64];
    ssize_t n = read(ex_rd, m, sizeof(m));
    for (ssize_t k = 0; k < n;) {
        if (m[k] == 'X' && k + 9 <= n) {
            memcpy(&st.t_exec_new, m + k + 1, 8);
            k += 9;
        } else if (m[k] == 'F') {
            finish_fifo();
            _exit(0);
        } else {
            k++;
        }
    }
    return n;
}

/* Commit FIFO: our own read end (non-blocking) plus a write end we keep ourselves, so the
 * read end never sees EOF/POLLHUP when a writer comes and goes.  Done by the guard before
 * it forks (the watcher inherits the fds; all O_CLOEXEC, so the new QEMU does not). */
static int setup_fifo(void)
{
    if (mkfifo(opt_commit, 0600) == 0)
        created_fifo = 1;
    else if (errno != EEXIST) {
        set_error("mkfifo %s: %s", opt_commit, strerror(errno));
        return -1;
    }
    fifo_rd = open(opt_commit, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat sb;
    if (fifo_rd < 0 || fstat(fifo_rd, &sb) < 0 || !S_ISFIFO(sb.st_mode)) {
        set_error("%s is not a usable FIFO: %s", opt_commit,
                  fifo_rd < 0 ? strerror(errno) : "not a FIFO");
        return -1;
    }
    fifo_wr = open(opt_commit, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fifo_wr < 0) {
        set_error("open %s for writing: %s", opt_commit, strerror(errno));
        return -1;
    }
    char junk[256]; /* drain what a stale writer left in a pre-existing FIFO */
    while (read(fifo_rd, junk, sizeof(junk)) > 0)
        ;
    return 0;
}

static int64_t mono_deadline;

/* Committed: the agent resumes the new QEMU next and then says "resumed". If it dies
 * first, the guest would stay paused: resume it here. Gives up after the commit timeout.
 * "abort" still rolls back: the agent sends it when its `cont` failed without a RESUME
 * (the new QEMU died or hung before the guest ran in it). What followed the commit in the
 * FIFO is still in `acc`. */
static void after_commit(char *acc, size_t *acc_n, size_t cap) __attribute__((noreturn));
static void after_commit(char *acc, size_t *acc_n, size_t cap)
{
    if (agent_fd < 0 || !opt_qmp)
        _exit(0);
    int64_t end = now_ns(CLOCK_MONOTONIC) + (int64_t)(opt_timeout * 1e9);
    for (;;) {
        int what;
        while ((what = next_message(acc, acc_n, cap))) {
            if (what == 3)
                goto done;
            if (what == 2) {
                st.t_event = now_ns(CLOCK_REALTIME);
                kill_and_rollback("abort-after-commit");
            }
        }
        struct pollfd pf[2] = {{.fd = fifo_rd, .events = POLLIN},
                               {.fd = agent_fd, .events = POLLIN}};
        int64_t left = end - now_ns(CLOCK_MONOTONIC);
        if (left <= 0)
            break;
        int r = poll(pf, 2, (int)(left / 1000000 + 1));
        if (r < 0 && errno != EINTR)
            break;
        if (r > 0 && pf[0].revents)
            continue; /* read at the top, before an agent gone is looked at */
        if (r > 0 && pf[1].revents) {
            st.t_agent_gone = now_ns(CLOCK_REALTIME);
            say("the agent is gone after the commit: resuming the guest");
            for (int i = 0; i < 50; i++) {
                if (resume_at(opt_qmp) == 0) {
                    st.t_resumed = now_ns(CLOCK_REALTIME);
                    st.reason = "resumed-by-watcher";
                    break;
                }
                usleep(20000);
            }
            if (!st.t_resumed)
                set_error("could not resume the guest at %s", opt_qmp);
            write_status();
            break;
        }
    }
done:
    finish_fifo();
    _exit(0);
}

static void commit_now(char *acc, size_t *acc_n, size_t cap) __attribute__((noreturn));
static void commit_now(char *acc, size_t *acc_n, size_t cap)
{
    st.phase = "committed";
    st.reason = "commit";
    st.t_commit = now_ns(CLOCK_REALTIME);
    if (agent_fd < 0 || !opt_qmp)
        finish_fifo();
    write_status();
    say("committed");
    after_commit(acc, acc_n, cap);
}

/* Whether a thread of `pid` is in a stop (state T). */
static int a_thread_stopped(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int stopped = 0;
    struct dirent *e;
    while (!stopped && (e = readdir(d))) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        char stat_path[384], buf[512];
        snprintf(stat_path, sizeof(stat_path), "%s/%s/stat", path, e->d_name);
        if (read_small(stat_path, buf, sizeof(buf)) < 0)
            continue;
        char *q = strrchr(buf, ')');
        stopped = q && q[1] == ' ' && (q[2] == 'T' || q[2] == 't');
    }
    closedir(d);
    return stopped;
}

/* SIGSTOP P and wait until one of its threads has stopped. The thread that takes a stop
 * marks every other thread of P first, so from then on none of them runs another user-space
 * instruction: a `cont` sent to P now is not acted on before P is killed or continued. */
static int freeze_p(void)
{
    if (syscall(SYS_pidfd_send_signal, pidfd, SIGSTOP, NULL, 0) < 0)
        return -1;
    int64_t end = now_ns(CLOCK_MONOTONIC) + 2000000000LL;
    while (!pid_gone(pidfd)) {
        if (a_thread_stopped(st.guard_pid))
            return 0;
        if (now_ns(CLOCK_MONOTONIC) > end) {
            say("pid %d did not stop within 2 s", (int)st.guard_pid);
            return -1;
        }
        usleep(100);
    }
    return -1;
}

/* `why` would roll back: P exited, the agent is gone, or the commit timed out. The agent
 * sends its commit without waiting for it to be taken and resumes the guest right after, so
 * a commit it sent before this decision must win over it: P is frozen first (if it still
 * runs), then the FIFO is read to its end. A commit there: P goes on, committed (a P that
 * exited is then the agent's to report: it gets no RESUME and says "abort"). None: the
 * agent has not sent it, so it has not sent its `cont` either, and a `cont` it sends from
 * now on finds P stopped, then gone: roll back. */
static void settle(const char *why, char *acc, size_t *acc_n, size_t cap)
    __attribute__((noreturn));
static void settle(const char *why, char *acc, size_t *acc_n, size_t cap)
{
    st.t_event = now_ns(CLOCK_REALTIME);
    int frozen = !pid_gone(pidfd) && freeze_p() == 0;
    if (frozen)
        say("%s: pid %d stopped; reading the commit FIFO before acting", why,
            (int)st.guard_pid);
    int what;
    while ((what = next_message(acc, acc_n, cap))) {
        if (what == 1) {
            if (frozen)
                syscall(SYS_pidfd_send_signal, pidfd, SIGCONT, NULL, 0);
            say("the agent's commit came before %s could act on it", why);
            st.t_event = 0;
            commit_now(acc, acc_n, cap);
        }
        if (what == 2) {
            why = "abort";
            break;
        }
    }
    if (pid_gone(pidfd)) {
        collect_exit();
        if (st.have_exit)
            say("pid %d exited before commit (wait status %d)", (int)st.guard_pid,
                st.exit_status);
        else
            say("pid %d exited before commit", (int)st.guard_pid);
        rollback(why);
    }
    if (!strcmp(why, "agent-gone"))
        say("the agent (pid %d) is gone before the commit", (int)opt_agent_pid);
    kill_and_rollback(why);
}

static void watcher(int ex_rd) __attribute__((noreturn));
static void watcher(int ex_rd)
{
    st.watcher_pid = getpid();
    ex_fd = ex_rd;
    prctl(PR_SET_NAME, "cpr-guard-watch", 0, 0, 0);

    /* Remember P's start time, to recognise it in /proc later. */
    {
        char state;
        int code;
        stat_fields(st.guard_pid, &state, &p_starttime, &code);
    }

    char acc[256];
    size_t acc_n = 0;
    acc[0] = 0;
    int ex_open = ex_rd >= 0;
    for (;;) {
        struct pollfd pf[4] = {
            {.fd = ex_open ? ex_rd : -1, .events = POLLIN},
            {.fd = pidfd, .events = POLLIN},
            {.fd = fifo_rd, .events = POLLIN},
            {.fd = agent_fd, .events = POLLIN},
        };
        int64_t left = mono_deadline - now_ns(CLOCK_MONOTONIC);
        int r = 0;
        if (left > 0) {
            int ms = left / 1000000 + 1;
            r = poll(pf, 4, ms);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                set_error("poll: %s", strerror(errno));
                sleep(1);
                continue;
            }
        }
        if (pf[0].revents) {
            /* Guard -> watcher: 'X' + exec timestamp, then EOF when the exec succeeded;
             * 'F' if the guard falls back to the old argv itself (we must not act). */
            ssize_t n = read_ex(ex_rd);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                /* EOF without 'F': the guard's exec of the new QEMU succeeded (or the guard
                 * died before it: then the pidfd fires too).  Only from here on does the
                 * watcher write the status file, so it never races with the guard's own. */
                ex_open = 0;
                ex_fd = -1;
                close(ex_rd);
                if (st.t_exec_new)
                    st.new_execed = 1;
                write_status();
            }
            continue;
        }
        if (pf[1].revents)
            settle(st.new_execed ? "new-exited" : "guard-exited", acc, &acc_n, sizeof(acc));
        /* The agent died before the commit: nobody will resume this QEMU, and the guest has
         * not run in it (-S): roll back at once. */
        if (pf[3].revents) {
            st.t_agent_gone = now_ns(CLOCK_REALTIME);
            settle("agent-gone", acc, &acc_n, sizeof(acc));
        }
        if (now_ns(CLOCK_MONOTONIC) >= mono_deadline)
            settle("commit-timeout", acc, &acc_n, sizeof(acc));
        int what;
        while (pf[2].revents && (what = next_message(acc, &acc_n, sizeof(acc)))) {
            if (what == 1)
                commit_now(acc, &acc_n, sizeof(acc));
            if (what == 2) {
                st.t_event = now_ns(CLOCK_REALTIME);
                kill_and_rollback("abort");
            }
        }
    }
}

/* ------------------------------------------------------------------ keeper (--keep) */

/* cpr-transfer and cpr-reboot: a process in the VM's host context, started by the agent
 * before the guest is stopped, that outlives the agent. On "done" it exits; if the agent
 * dies first it brings the guest back: the new QEMU if the guest runs there already, else
 * the old QEMU while it exists, else (cpr-reboot after the old one quit) the new QEMU
 * loaded from the saved state. */
static pid_t opt_old_pid;
static unsigned long long opt_old_start;
static const char *opt_vm_qmp, *opt_new_qmp, *opt_state;
static double opt_act_timeout = 60.0;

static struct {
    const char *phase, *action;
    int64_t t_start, t_agent_gone, t_resumed;
} kp;

static void keeper_status(void)
{
    struct buf b;
    b.n = 0;
    bput(&b, "{\"version\":1,\"role\":\"keeper\"");
    bstr(&b, "phase", kp.phase);
    bstr(&b, "action", kp.action);
    bpid(&b, "keeper_pid", getpid());
    bts(&b, "t_start_ns", kp.t_start);
    bts(&b, "t_agent_gone_ns", kp.t_agent_gone);
    bts(&b, "t_resumed_ns", kp.t_resumed);
    bstr(&b, "error", st.error);
    bput(&b, "}\n");
    write_buf(&b);
}

static void keeper_end(const char *phase, const char *action, int code)
    __attribute__((noreturn));
static void keeper_end(const char *phase, const char *action, int code)
{
    kp.phase = phase;
    kp.action = action;
    if (!strcmp(phase, "kept"))
        kp.t_resumed = now_ns(CLOCK_REALTIME);
    keeper_status();
    finish_fifo();
    say("keeper: %s (%s)", phase, action ? action : "-");
    _exit(code);
}

static void load_state(struct qmp *q)
{
    char cmd[PATH_MAX + 128];
    qmp_cmd(q, "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"mode\":\"cpr-reboot\"}}",
            3000);
    qmp_cmd(q, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
               "[{\"capability\":\"x-ignore-shared\",\"state\":true}]}}", 3000);
    snprintf(cmd, sizeof(cmd), "{\"execute\":\"migrate-incoming\",\"arguments\":"
             "{\"uri\":\"file:%s\"}}", opt_state);
    qmp_cmd(q, cmd, 3000);
}

static void keeper_act(int old_fd) __attribute__((noreturn));
static void keeper_act(int old_fd)
{
    kp.phase = "acting";
    kp.t_agent_gone = now_ns(CLOCK_REALTIME);
    keeper_status();
    say("keeper: the agent (pid %d) is gone; bringing the guest back", (int)opt_agent_pid);
    int64_t end = mono_ms() + (int64_t)(opt_act_timeout * 1000);
    int killed_new = 0;
    while (mono_ms() < end) {
        int old_alive = !pid_gone(old_fd);
        struct qmp q;
        char run[64] = "", mig[64] = "";
        int have_new = 0;
        if (access(opt_new_qmp, F_OK) == 0 && !killed_new)
            have_new = qmp_open(&q, opt_new_qmp, 300) == 0;
        else if (!old_alive)
            have_new = qmp_open(&q, opt_vm_qmp, 300) == 0;
        if (have_new && qmp_state(&q, run, mig, sizeof(run)) < 0) {
            qmp_close(&q);
            have_new = 0;
        }
        if (have_new && !strcmp(run, "running")) {
            /* The guest runs in the new QEMU: finish the handover. */
            qmp_close(&q);
            if (old_alive) {
                syscall(SYS_pidfd_send_signal, old_fd, SIGTERM, NULL, 0);
                if (!wait_pidfd(old_fd, 5000)) {
                    syscall(SYS_pidfd_send_signal, old_fd, SIGKILL, NULL, 0);
                    wait_pidfd(old_fd, 5000);
                }
            }
            if (access(opt_new_qmp, F_OK) == 0 && rename(opt_new_qmp, opt_vm_qmp) < 0)
                set_error("rename %s: %s", opt_new_qmp, strerror(errno));
            keeper_end("kept", "kept-new", 0);
        }
        if (old_alive) {
            /* The guest never ran in the new QEMU: stop it, continue the old one. */
            if (have_new)
                qmp_close(&q);
            if (!killed_new) {
                kill_marked(opt_new_qmp);
                killed_new = 1;
            }
            if (resume_at(opt_vm_qmp) == 0)
                keeper_end("kept", "resumed-old", 0);
        } else if (have_new) {
            /* cpr-reboot after the old QEMU quit: the new one is the only way on. */
            if (access(opt_new_qmp, F_OK) == 0 && rename(opt_new_qmp, opt_vm_qmp) < 0)
                set_error("rename %s: %s", opt_new_qmp, strerror(errno));
            if (!strcmp(mig, "none") && !strcmp(run, "inmigrate") && opt_state)
                load_state(&q);
            else if (!strcmp(mig, "completed") && continuable(run)) {
                qmp_cmd(&q, "{\"execute\":\"migrate-set-capabilities\",\"arguments\":"
                            "{\"capabilities\":[{\"capability\":\"x-ignore-shared\","
                            "\"state\":false}]}}", 3000);
                qmp_cmd(&q, "{\"execute\":\"migrate-set-parameters\",\"arguments\":"
                            "{\"mode\":\"normal\"}}", 3000);
                if (qmp_cmd(&q, "{\"execute\":\"cont\"}", 3000) == 0) {
                    qmp_close(&q);
                    keeper_end("kept", "loaded-new", 0);
                }
            } else if (!strcmp(mig, "failed") || !strcmp(mig, "cancelled")) {
                set_error("the new QEMU failed to load the saved state");
                qmp_close(&q);
                keeper_end("failed", "load-failed", 1);
            }
            qmp_close(&q);
        }
        usleep(10000);
    }
    set_error("%s%sno QEMU could be brought back within %.0fs", st.error,
              *st.error ? "; " : "", opt_act_timeout);
    keeper_end("failed", "gave-up", 1);
}

static int keeper_main(const char *bad)
{
    kp.t_start = now_ns(CLOCK_REALTIME);
    kp.phase = "starting";
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    if (!*bad && (!opt_status || !opt_commit || !opt_vm_qmp || !opt_new_qmp ||
                  !opt_agent_pid || !opt_old_pid))
        bad = "--keep needs --status, --commit, --vm-qmp, --workdir, --agent-pid, --old-pid";
    if (*bad) {
        set_error("bad arguments: %s", bad);
        return 2;
    }
    open_log();
    int old_fd = open_pid(opt_old_pid, opt_old_start);
    if (old_fd < 0) {
        set_error("the old QEMU (pid %d) is gone", (int)opt_old_pid);
        keeper_end("failed", "no-old-qemu", 2);
    }
    if (setup_fifo() < 0)
        keeper_end("failed", "no-fifo", 2);
    agent_fd = open_pid(opt_agent_pid, opt_agent_start);
    if (agent_fd < 0)
        keeper_act(old_fd);
    kp.phase = "watching";
    keeper_status();
    char acc[256];
    size_t acc_n = 0;
    acc[0] = 0;
    for (;;) {
        struct pollfd pf[2] = {{.fd = fifo_rd, .events = POLLIN},
                               {.fd = agent_fd, .events = POLLIN}};
        int r = poll(pf, 2, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            set_error("poll: %s", strerror(errno));
            keeper_end("failed", "poll", 1);
        }
        int what;
        while (pf[0].revents && (what = next_message(acc, &acc_n, sizeof(acc))))
            if (what == 3)
                keeper_end("done", NULL, 0);
        if (pf[1].revents)
            keeper_act(old_fd);
    }
}

/* ------------------------------------------------------------------ guard (pid P) */

static int status_dir_writable(void)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", opt_status);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = 0;
    else
        *slash = 0;
    if (access(dir, W_OK | X_OK) < 0) {
        set_error("status directory %s: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

static void fallback(const char *reason, int ex_wr) __attribute__((noreturn));
static void fallback(const char *reason, int ex_wr)
{
    if (ex_wr >= 0)
        write_all(ex_wr, "F", 1); /* the watcher, if alive, must stand down */
    if (created_fifo)
        unlink(opt_commit);
    say("not updating: %s", st.error);
    exec_old(reason);
    _exit(1);
}

static int has_incoming(char **v)
{
    for (; *v; v++)
        if (!strcmp(*v, "-incoming") || !strcmp(*v, "--incoming"))
            return 1;
    return 0;
}

static const char *check_argv(char **v, const char *which)
{
    static char why[256];
    if (!v || !v[0]) {
        snprintf(why, sizeof(why), "%s argv is empty", which);
        return why;
    }
    if (v[0][0] != '/') {
        snprintf(why, sizeof(why), "%s binary '%s' is not an absolute path", which, v[0]);
        return why;
    }
    if (!has_incoming(v + 1)) {
        snprintf(why, sizeof(why), "%s argv has no -incoming", which);
        return why;
    }
    return NULL;
}

static void usage(void)
{
    static const char u[] =
        "usage: vmupdate-cpr-guard [--check] --status FILE --commit FIFO\n"
        "         [--commit-timeout SEC] [--log FILE] [--old-argc N] [--sigmask HEX]\n"
        "         -- OLD_BINARY OLD_ARGS... -incoming URI -- NEW_BINARY NEW_ARGS...\n"
        "Run as QEMU's cpr-exec-command. Paths must be absolute. See README.md.\n"
        "   or: vmupdate-cpr-guard --seize --old-pid PID [--old-start TICKS] (same options)\n"
        "Started before the migrate; QEMU's cpr-exec-command is then the new QEMU itself.\n";
    write_all(2, u, sizeof(u) - 1);
}

/* ------------------------------------------------------------------ seizer (--seize) */

/* cpr-exec without the guard in the exec chain. Started by the agent before the STOP, in the
 * VM's host context (as the keeper is), it seizes the VM's QEMU (pid P) with ptrace and
 * waits for its exec: QEMU then execs the new binary directly, and the exec stops P before
 * the new program runs an instruction. The seizer takes P's descriptors (pidfd_getfd; the
 * CLOEXEC ones are closed by then, what is left is what QEMU preserved), its environment,
 * limits, umask and working directory, lets P go, and is from then on the watcher of the
 * exec-through guard: same status file, same commit FIFO, same rollback, except that the old
 * QEMU comes back in the seizer's pid on copies of the descriptors put back at P's numbers.
 * The exec-through guard costs a second exec inside the guest's pause; this costs a ptrace
 * stop. A seize the kernel refuses (Yama, another tracer) leaves status "seize-failed" and
 * nothing touched: the agent falls back to the exec-through guard. */

#define MAX_TAKEN 1024
static struct { int target, copy; } taken[MAX_TAKEN];
static int n_taken;
static int p_cwd = -1;
static mode_t p_umask = 022;
static struct rlimit p_limits[RLIM_NLIMITS];
static int have_limits;

static int seize_end(const char *phase, int code) __attribute__((noreturn));
static int seize_end(const char *phase, int code)
{
    st.phase = phase;
    write_status();
    say("%s%s%s", phase, *st.error ? ": " : "", st.error);
    finish_fifo();
    _exit(code); /* a tracer's exit detaches its tracee */
}

/* The whole of /proc/P/environ, split at its NULs. */
static char **read_environ(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/environ", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf)
            break;
        if (n == cap) {
            char *more = realloc(buf, (cap *= 2) + 1);
            if (!more) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = more;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (!buf)
        return NULL;
    buf[n] = 0;
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += !buf[i];
    char **env = calloc(count + 2, sizeof(char *));
    if (!env)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i += strlen(buf + i) + 1)
        env[k++] = buf + i;
    env[k] = NULL;
    return env;
}

/* At P's exec stop: everything the rollback needs from P, which is gone when it is needed. */
static void take_from_p(pid_t p)
{
    p_env = read_environ(p);
    if (!p_env)
        set_error("cannot read /proc/%d/environ", (int)p);
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/cwd", (int)p);
    p_cwd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    snprintf(path, sizeof(path), "/proc/%d/status", (int)p);
    char sbuf[4096];
    if (read_small(path, sbuf, sizeof(sbuf)) > 0) {
        char *u = strstr(sbuf, "\nUmask:");
        if (u)
            p_umask = (mode_t)strtoul(u + 7, NULL, 8);
    }
    have_limits = 1;
    for (int r = 0; r < RLIM_NLIMITS; r++)
        if (prlimit(p, (enum __rlimit_resource)r, NULL, &p_limits[r]) < 0)
            have_limits = 0;
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)p);
    DIR *d = opendir(path);
    if (!d) {
        set_error("cannot list %s: %s", path, strerror(errno));
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) && n_taken < MAX_TAKEN) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        int target = atoi(e->d_name);
        int copy = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0); /* O_CLOEXEC */
        if (copy < 0) {
            set_error("pidfd_getfd(%d): %s", target, strerror(errno));
            continue;
        }
        taken[n_taken].target = target;
        taken[n_taken].copy = copy;
        n_taken++;
    }
    closedir(d);
    const char *env = NULL;
    for (char **v = p_env; v && *v; v++)
        if (!strncmp(*v, STATE_ENV "=", sizeof(STATE_ENV)))
            env = *v + sizeof(STATE_ENV);
    for (int i = 0; env && i < n_taken; i++)
        if (taken[i].target == atoi(env))
            state_fd = taken[i].copy;
}

/* Right before the rollback's execve: P's descriptors at P's numbers (without CLOEXEC), the
 * seizer's own out of their way first, and P's limits, umask and working directory. */
static void restore_p(void)
{
    int top = 0;
    for (int i = 0; i < n_taken; i++)
        if (taken[i].target > top)
            top = taken[i].target;
    for (int i = 0; i < n_taken; i++) {
        int c = taken[i].copy;
        if (c <= top) {
            int moved = fcntl(c, F_DUPFD_CLOEXEC, top + 1);
            if (moved >= 0) {
                close(c);
                taken[i].copy = moved;
            }
        }
    }
    if (log_fd >= 0 && log_fd <= top) {
        int moved = fcntl(log_fd, F_DUPFD_CLOEXEC, top + 1);
        log_fd = moved;
    }
    for (int i = 0; i < n_taken; i++)
        if (dup2(taken[i].copy, taken[i].target) < 0)
            say("cannot restore fd %d: %s", taken[i].target, strerror(errno));
    if (p_cwd >= 0 && fchdir(p_cwd) < 0)
        say("cannot enter QEMU's working directory: %s", strerror(errno));
    umask(p_umask);
    for (int r = 0; have_limits && r < RLIM_NLIMITS; r++)
        setrlimit((enum __rlimit_resource)r, &p_limits[r]); /* best effort: raising a hard
                                                               limit needs privilege */
}

/* Whether the program P now runs is this update's new QEMU: its command line carries the
 * new argv's -incoming URI (the state file of this operation), directly or through a
 * wrapper. */
static int exec_is_ours(pid_t p)
{
    const char *uri = NULL;
    for (char **v = new_argv; v && *v; v++)
        if ((!strcmp(*v, "-incoming") || !strcmp(*v, "--incoming")) && v[1])
            uri = v[1];
    char path[64], buf[65536];
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)p);
    int n = read_small(path, buf, sizeof(buf));
    if (!uri || n <= 0)
        return 0;
    for (int i = 0; i < n; i += (int)strlen(buf + i) + 1)
        if (!strcmp(buf + i, uri))
            return 1;
    return 0;
}

/* Seize every thread of P. QEMU runs cpr-exec-command from whichever thread holds its big
 * lock and polls the main loop's bottom halves (the main thread, or one draining I/O), and
 * the kernel reports an exec only to the exec'ing thread's tracer: a tracer of the main
 * thread alone would miss it. Threads started later are traced through PTRACE_O_TRACECLONE;
 * one started by a thread not yet seized is found by listing again until a pass finds none.
 * The number of threads seized; -1, with the error set, when one cannot be (a thread that
 * ends meanwhile is not an error). */
static int seize_threads(pid_t p)
{
    static pid_t seized[4096];
    int n = 0, found = 1;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", (int)p);
    long opts = PTRACE_O_TRACEEXEC | PTRACE_O_TRACECLONE;
    if (ptrace(PTRACE_SEIZE, p, 0, (void *)opts) < 0) {
        set_error("ptrace(PTRACE_SEIZE) of pid %d: %s", (int)p, strerror(errno));
        return -1;
    }
    seized[n++] = p;
    while (found) {
        found = 0;
        DIR *d = opendir(path);
        if (!d) {
            set_error("%s: %s", path, strerror(errno));
            return -1;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            pid_t t = (pid_t)atoi(e->d_name);
            int known = t <= 0;
            for (int i = 0; i < n && !known; i++)
                known = seized[i] == t;
            if (known)
                continue;
            if (n == (int)(sizeof(seized) / sizeof(seized[0]))) {
                closedir(d);
                set_error("pid %d has more than %d threads", (int)p, n);
                return -1;
            }
            seized[n++] = t;
            found = 1;
            if (ptrace(PTRACE_SEIZE, t, 0, (void *)opts) < 0 && errno != ESRCH) {
                closedir(d);
                set_error("ptrace(PTRACE_SEIZE) of thread %d of pid %d: %s", (int)t, (int)p,
                          strerror(errno));
                return -1;
            }
        }
        closedir(d);
    }
    return n;
}

static void seize_main(void) __attribute__((noreturn));
static void seize_main(void)
{
    pid_t p = opt_old_pid;
    st.guard_pid = st.qemu_pid = p;
    st.watcher_pid = getpid();
    prctl(PR_SET_NAME, "cpr-guard-seize", 0, 0, 0);
    open_log();
    if (status_dir_writable() < 0)
        _exit(2);
    pidfd = open_pid(p, opt_old_start);
    if (pidfd < 0) {
        set_error("the VM's QEMU (pid %d) is gone", (int)p);
        seize_end("seize-failed", 2);
    }
    p_starttime = opt_old_start;
    if (setup_fifo() < 0)
        seize_end("seize-failed", 2);
    if (opt_agent_pid) {
        agent_fd = open_pid(opt_agent_pid, opt_agent_start);
        if (agent_fd < 0) {
            set_error("the agent (pid %d) is gone", (int)opt_agent_pid);
            seize_end("seize-failed", 2);
        }
    }
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        set_error("signalfd: %s", strerror(errno));
        seize_end("seize-failed", 2);
    }
    int threads = seize_threads(p);
    if (threads < 0)
        seize_end("seize-failed", 3);
    st.t_ready = now_ns(CLOCK_REALTIME);
    st.deadline = st.t_ready + (int64_t)(opt_timeout * 1e9);
    mono_deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(opt_timeout * 1e9);
    st.phase = "seized";
    write_status();
    say("seized pid %d (%d threads); waiting for its exec", (int)p, threads);
    if (have_sigmask)
        say("the new QEMU, or the old one, will start with signal mask %016llx",
            (unsigned long long)opt_sigmask);

    /* Until P's exec. The agent dying meanwhile changes nothing: the migrate may be on its
     * way, and after the exec the watcher rolls back for want of an agent. */
    char acc[256];
    size_t acc_n = 0;
    acc[0] = 0;
    for (;;) {
        struct pollfd pf[2] = {{.fd = sfd, .events = POLLIN},
                               {.fd = fifo_rd, .events = POLLIN}};
        int64_t left = mono_deadline - now_ns(CLOCK_MONOTONIC);
        if (left <= 0) {
            st.reason = "no-exec";
            seize_end("released", 0);
        }
        int r = poll(pf, 2, (int)(left / 1000000 + 1));
        if (r < 0 && errno != EINTR) {
            set_error("poll: %s", strerror(errno));
            seize_end("released", 1);
        }
        if (r <= 0)
            continue;
        if (pf[0].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) == sizeof(si))
                ;
            int ws;
            pid_t w;
            while ((w = waitpid(-1, &ws, __WALL | WNOHANG)) > 0) {
                if ((WIFEXITED(ws) || WIFSIGNALED(ws)) && w != p)
                    continue; /* one of QEMU's threads ended (all do at an exec) */
                if (WIFEXITED(ws) || WIFSIGNALED(ws)) {
                    /* Before any exec: QEMU died on its own, with the guest in it. Or a
                     * thread the seizer missed exec'd: then P runs the new program
                     * unwatched. Either way there is nothing to roll back with. */
                    set_error("pid %d %s before its exec was seen", (int)p,
                              pid_gone(pidfd) ? "exited" : "exec'd from an untraced thread");
                    st.reason = pid_gone(pidfd) ? "exited" : "exec-unseen";
                    seize_end("released", 1);
                }
                if (!WIFSTOPPED(ws))
                    continue;
                int event = ws >> 16, sig = WSTOPSIG(ws);
                if (event == PTRACE_EVENT_CLONE) {
                    ptrace(PTRACE_CONT, w, 0, 0); /* a new thread: traced already, go on */
                    continue;
                }
                if (event == PTRACE_EVENT_EXEC && w != p) {
                    /* not a thread of P (a clone that is a process of its own): not ours */
                    ptrace(PTRACE_DETACH, w, 0, 0);
                    continue;
                }
                if (event == PTRACE_EVENT_EXEC && !exec_is_ours(p)) {
                    /* Another update's exec (this seizer outlived its own): not ours to
                     * watch. */
                    ptrace(PTRACE_DETACH, p, 0, 0);
                    st.reason = "foreign-exec";
                    seize_end("released", 0);
                }
                if (event == PTRACE_EVENT_EXEC) {
                    st.t_exec_new = now_ns(CLOCK_REALTIME);
                    take_from_p(p);
                    /* Whichever thread exec'd (the only one left, now pid P), the new QEMU
                     * starts with the main thread's mask. */
                    if (have_sigmask &&
                        ptrace(PTRACE_SETSIGMASK, p, (void *)sizeof(opt_sigmask),
                               &opt_sigmask) < 0)
                        say("ptrace(PTRACE_SETSIGMASK): %s", strerror(errno));
                    if (ptrace(PTRACE_DETACH, p, 0, 0) < 0)
                        say("ptrace(PTRACE_DETACH): %s", strerror(errno));
                    close(sfd);
                    /* SIGCHLD was blocked for the signalfd; the mask crosses execve, and the
                     * old QEMU of a rollback must not start with it blocked. */
                    sigprocmask(SIG_UNBLOCK, &chld, NULL);
                    st.new_execed = 1;
                    st.phase = "watching";
                    st.deadline = st.t_exec_new + (int64_t)(opt_timeout * 1e9);
                    mono_deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(opt_timeout * 1e9);
                    write_status();
                    say("pid %d exec'd; took %d descriptors", (int)p, n_taken);
                    watcher(-1);
                }
                if (event == PTRACE_EVENT_STOP) {
                    /* group-stop (or a new thread's first stop): leave it as it would be */
                    if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
                        ptrace(PTRACE_LISTEN, w, 0, 0);
                    else
                        ptrace(PTRACE_CONT, w, 0, 0);
                } else {
                    ptrace(PTRACE_CONT, w, 0, (void *)(long)sig); /* deliver it */
                }
            }
        }
        if (pf[1].revents) {
            int what;
            while ((what = next_message(acc, &acc_n, sizeof(acc))) == 1)
                ; /* a commit before any exec: nothing to commit */
            if (what == 2 || what == 3) {
                /* The migration failed inside QEMU (no exec will come), or the agent gave up
                 * before it: let P go as it is. */
                st.reason = what == 2 ? "abort" : "done";
                seize_end("released", 0);
            }
        }
    }
}

int main(int argc, char **argv)
{
    st.t_guard = now_ns(CLOCK_REALTIME);
    st.guard_pid = st.qemu_pid = getpid();
    st.phase = "starting";

    int check = 0, keep = 0;
    long old_argc = -1;
    char bad[256] = "";
    int i = 1;

    for (; i < argc && strcmp(argv[i], "--"); i++) {
        const char *a = argv[i];
        const char *val = NULL;
        size_t klen = strlen(a);
        const char *eq = strchr(a, '=');
        if (!strcmp(a, "--check")) {
            check = 1;
            continue;
        }
        if (!strcmp(a, "--keep")) {
            keep = 1;
            continue;
        }
        if (!strcmp(a, "--seize")) {
            opt_seize = 1;
            continue;
        }
        if (!strcmp(a, "--version")) {
            write_all(1, GUARD_VERSION "\n", sizeof(GUARD_VERSION));
            return 0;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
        if (eq) {
            klen = (size_t)(eq - a);
            val = eq + 1;
        } else if (i + 1 < argc && strcmp(argv[i + 1], "--")) {
            val = argv[++i];
        }
#define OPT(name) (klen == sizeof(name) - 1 && !strncmp(a, name, klen))
        if (!val) {
            snprintf(bad, sizeof(bad), "option %s needs a value", a);
        } else if (OPT("--status")) {
            opt_status = val;
        } else if (OPT("--commit")) {
            opt_commit = val;
        } else if (OPT("--log")) {
            opt_log = val;
        } else if (OPT("--commit-timeout")) {
            char *end;
            opt_timeout = strtod(val, &end);
            if (*end || !(opt_timeout > 0 && opt_timeout <= 86400))
                snprintf(bad, sizeof(bad), "bad --commit-timeout '%s'", val);
        } else if (OPT("--agent-pid") || OPT("--old-pid")) {
            char *end;
            long v = strtol(val, &end, 10);
            if (*end || v < 1 || v > INT_MAX)
                snprintf(bad, sizeof(bad), "bad %.*s '%s'", (int)klen, a, val);
            else if (OPT("--agent-pid"))
                opt_agent_pid = (pid_t)v;
            else
                opt_old_pid = (pid_t)v;
        } else if (OPT("--agent-start") || OPT("--old-start")) {
            char *end;
            unsigned long long v = strtoull(val, &end, 10);
            if (*end)
                snprintf(bad, sizeof(bad), "bad %.*s '%s'", (int)klen, a, val);
            else if (OPT("--agent-start"))
                opt_agent_start = v;
            else
                opt_old_start = v;
        } else if (OPT("--qmp") || OPT("--vm-qmp") || OPT("--workdir") || OPT("--state")) {
            if (val[0] != '/')
                snprintf(bad, sizeof(bad), "%.*s must be an absolute path", (int)klen, a);
            else if (OPT("--qmp"))
                opt_qmp = val;
            else if (OPT("--vm-qmp"))
                opt_vm_qmp = val;
            else if (OPT("--workdir")) {
                /* The new QEMU's own QMP socket is <workdir>/qmp.sock. Not given whole, so
                 * that the keeper is not taken for the new QEMU by its command line. */
                static char newq[PATH_MAX];
                if (snprintf(newq, sizeof(newq), "%s/qmp.sock", val) < (int)sizeof(newq))
                    opt_new_qmp = newq;
            }
            else
                opt_state = val;
        } else if (OPT("--sigmask")) {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(val, &end, 16);
            if (*end || !*val || errno)
                snprintf(bad, sizeof(bad), "bad --sigmask '%s' (hex, as SigBlk in "
                         "/proc/PID/status)", val);
            else
                opt_sigmask = v, have_sigmask = 1;
        } else if (OPT("--act-timeout")) {
            char *end;
            opt_act_timeout = strtod(val, &end);
            if (*end || !(opt_act_timeout > 0 && opt_act_timeout <= 86400))
                snprintf(bad, sizeof(bad), "bad --act-timeout '%s'", val);
        } else if (OPT("--old-argc")) {
            char *end;
            old_argc = strtol(val, &end, 10);
            if (*end || old_argc < 1)
                snprintf(bad, sizeof(bad), "bad --old-argc '%s'", val);
        } else {
            snprintf(bad, sizeof(bad), "unknown option '%.*s'", (int)klen, a);
        }
#undef OPT
    }

    if (keep) {
        if (opt_status && opt_status[0] != '/')
            opt_status = NULL, snprintf(bad, sizeof(bad), "--status must be an absolute path");
        return keeper_main(bad);
    }

    /* Locate the two argvs even if an option was bad: the old one is the way back. */
    if (i < argc) {
        int o = i + 1, sep = -1;
        if (old_argc > 0) {
            if (o + old_argc < argc && !strcmp(argv[o + old_argc], "--"))
                sep = o + (int)old_argc;
        } else {
            for (int k = o; k < argc; k++)
                if (!strcmp(argv[k], "--")) {
                    sep = k;
                    break;
                }
        }
        if (sep > o) {
            argv[sep] = NULL; /* terminates old_argv in place: no allocation */
            old_argv = argv + o;
            new_argv = argv + sep + 1;
        }
    }

    if (opt_status && opt_status[0] != '/')
        opt_status = NULL, snprintf(bad, sizeof(bad), "--status must be an absolute path");
    if (opt_log && opt_log[0] != '/')
        opt_log = NULL, snprintf(bad, sizeof(bad), "--log must be an absolute path");
    if (!*bad && !opt_status)
        snprintf(bad, sizeof(bad), "--status FILE is required");
    if (!*bad && (!opt_commit || opt_commit[0] != '/'))
        snprintf(bad, sizeof(bad), "--commit FIFO (absolute path) is required");

    const char *old_bad = old_argv ? check_argv(old_argv, "old") : "cannot find '-- OLD... -- NEW...'";
    if (old_bad) {
        /* No way back: refuse to do anything. */
        set_error("bad arguments: %s%s%s", old_bad, *bad ? "; " : "", bad);
        if (!check)
            usage();
        st.phase = opt_seize ? "seize-failed" : "rollback-failed"; /* seize: nothing touched */
        st.reason = "bad-arguments";
        st.qemu_pid = 0;
        if (!check)
            write_status();
        return 2;
    }
    const char *new_bad = check_argv(new_argv, "new");
    if (!*bad && new_bad)
        snprintf(bad, sizeof(bad), "%s", new_bad);
    if (opt_seize && !check) {
        if (!*bad && !opt_old_pid)
            snprintf(bad, sizeof(bad), "--seize needs --old-pid");
        if (*bad) {
            set_error("bad arguments: %s", bad);
            seize_end("seize-failed", 2);
        }
        seize_main();
    }

    const char *env = getenv(STATE_ENV);
    if (env && *env) {
        char *end;
        long fd = strtol(env, &end, 10);
        if (!*end && fd >= 0 && fd < INT_MAX && fcntl((int)fd, F_GETFD) >= 0)
            state_fd = (int)fd;
        else
            say("warning: %s=%s is not an open fd", STATE_ENV, env);
    } else if (!check) {
        say("warning: %s is not set (not started by QEMU cpr-exec?)", STATE_ENV);
    }

    if (check) {
        if (!*bad && access(old_argv[0], X_OK) < 0)
            snprintf(bad, sizeof(bad), "old binary %s: %s", old_argv[0], strerror(errno));
        if (!*bad && access(new_argv[0], X_OK) < 0)
            snprintf(bad, sizeof(bad), "new binary %s: %s", new_argv[0], strerror(errno));
        if (*bad) {
            set_error("check failed: %s", bad);
            return 2;
        }
        write_all(1, "ok\n", 3);
        return 0;
    }
    if (*bad) {
        set_error("bad arguments: %s", bad);
        fallback("bad-arguments", -1);
    }

    /* 1. pidfd on ourselves: stays valid across our exec of the new QEMU. */
    pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0); /* always O_CLOEXEC */
    if (pidfd < 0) {
        set_error("pidfd_open: %s", strerror(errno));
        fallback("watcher-failed", -1);
    }
    open_log();
    /* The watcher, the new QEMU and the old one all start from the guard's mask. */
    apply_sigmask();
    if (status_dir_writable() < 0 || setup_fifo() < 0)
        fallback("watcher-failed", -1);
    if (opt_agent_pid) {
        /* The agent died before we started: nobody would commit; do not update. */
        agent_fd = open_pid(opt_agent_pid, opt_agent_start);
        if (agent_fd < 0) {
            st.t_agent_gone = now_ns(CLOCK_REALTIME);
            set_error("the agent (pid %d) is gone", (int)opt_agent_pid);
            fallback("agent-gone", -1);
        }
    }

    int ready[2], ex[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(ex, O_CLOEXEC) < 0) {
        set_error("pipe2: %s", strerror(errno));
        fallback("watcher-failed", -1);
    }

    /* 2. Double fork: the watcher is reparented to the subreaper/init, never QEMU's child.
     * The intermediate child reports the watcher's pid (or the fork error) and exits; the
     * guard does not wait for the watcher to be scheduled. */
    st.phase = "watching";
    st.t_ready = now_ns(CLOCK_REALTIME);
    st.deadline = st.t_ready + (int64_t)(opt_timeout * 1e9);
    mono_deadline = now_ns(CLOCK_MONOTONIC) + (int64_t)(opt_timeout * 1e9);
    pid_t c = fork();
    if (c < 0) {
        set_error("fork: %s", strerror(errno));
        fallback("watcher-failed", -1);
    }
    if (c == 0) {
        close(ready[0]);
        close(ex[1]);
        pid_t w = fork();
        if (w == 0) {
            close(ready[1]);
            watcher(ex[0]);
        }
        char m[128];
        int n = w > 0 ? snprintf(m, sizeof(m), "R%d", (int)w)
                      : snprintf(m, sizeof(m), "Efork (watcher): %s", strerror(errno));
        write_all(ready[1], m, (size_t)n);
        _exit(0);
    }
    close(ready[1]);
    close(ex[0]);
    while (waitpid(c, NULL, 0) < 0 && errno == EINTR)
        ;
    char rmsg[160];
    ssize_t n;
    do
        n = read(ready[0], rmsg, sizeof(rmsg) - 1);
    while (n < 0 && errno == EINTR);
    rmsg[n > 0 ? n : 0] = 0;
    close(ready[0]);
    if (n < 2 || rmsg[0] != 'R') {
        set_error("%s", n > 1 ? rmsg + 1 : "watcher could not be started");
        fallback("watcher-failed", ex[1]);
    }
    st.watcher_pid = atoi(rmsg + 1);

    /* 4. Exec the new QEMU in this pid. */
    char xm[9];
    int64_t t = now_ns(CLOCK_REALTIME);
    xm[0] = 'X';
    memcpy(xm + 1, &t, 8);
    write_all(ex[1], xm, sizeof(xm));
    execve(new_argv[0], new_argv, environ);
    set_error("execve %s: %s", new_argv[0], strerror(errno));
    fallback("exec-new-failed", ex[1]);
}
