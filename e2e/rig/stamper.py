"""Stamp each line of a growing file with its host arrival time, in a process of its own.

Run by SerialMonitor as ``python stamper.py PATH POLL_S``; prints ``<monotonic ns> <line>``.
Its own process keeps the stamps honest: a thread in the test process shares the GIL with
the agent under test, and a busy agent would delay the reads and shift the stamps. It exits
when the file's follower (its parent) goes away or stdin closes.
"""

import contextlib
import os
import sys
import time


def main() -> int:
    path, poll = sys.argv[1], float(sys.argv[2])
    # A busy host must not delay the stamps either: run ahead of ordinary processes when
    # allowed (root); the loop sleeps between reads, so it takes next to no CPU.
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    parent = os.getppid()
    out = sys.stdout.buffer
    fd, pending = -1, b""
    while os.getppid() == parent:
        if fd < 0:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                time.sleep(poll)
                continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            time.sleep(poll)
            continue
        now = time.monotonic_ns()
        pending += chunk
        if b"\n" in pending:
            *complete, pending = pending.split(b"\n")
            out.write(b"".join(b"%d %s\n" % (now, line) for line in complete))
            out.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
