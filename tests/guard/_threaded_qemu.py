"""Plays a multithreaded QEMU for the seizer tests; run as a script.

It holds the CPR state memfd (named by $QEMU_CPR_EXEC_STATE) and a RAM memfd at fd 100,
blocks SIGUSR1 and SIGALRM in its main thread, starts a few threads and writes READY; when
TRIGGER appears, one of its other threads blocks every signal and execs ARGV, as QEMU does
when a thread of its own runs the cpr-exec bottom half.

Usage: _threaded_qemu.py READY TRIGGER -- ARGV...
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STATE = b"QEMU-CPR-STATE:" + bytes(range(256)) * 16


def main() -> None:
    ready, trigger = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGALRM})
    state = os.memfd_create("QEMU_CPR_EXEC_STATE", 0)
    os.write(state, STATE)
    os.set_inheritable(state, True)
    ram = os.memfd_create("ram0", 0)
    os.ftruncate(ram, 1 << 20)
    os.dup2(ram, 100)  # inheritable
    os.close(ram)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "QEMU_CPR_EXEC_STATE": str(state)}

    def exec_new() -> None:
        while not os.path.exists(trigger):
            time.sleep(0.005)
        signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
        os.execve(argv[0], argv, env)

    # All started before the seizer comes: the exec'ing one among them.
    for _ in range(3):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    threading.Thread(target=exec_new, daemon=True).start()
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


if __name__ == "__main__":
    main()
