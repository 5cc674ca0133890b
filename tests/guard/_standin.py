"""Stand-in for a QEMU binary in the guard tests: records what it was given, then acts.

argv: _standin.py --out FILE --act ACTION [anything else, e.g. -incoming URI]
Records pid, ppid, argv, env, every open fd (dev, ino, inheritable), the file offset of the
fd named by $QEMU_CPR_EXEC_STATE and the signal mask it started with, as one JSON line
appended to FILE. Actions:
exit1 (move the state offset to the end, like QEMU reading it, then exit 1), exit7, sleep.
"""

import json
import os
import sys
import time

t = time.time_ns()
fds = {}
for fd in range(256):
    try:
        s = os.fstat(fd)
    except OSError:
        continue
    fds[str(fd)] = [s.st_dev, s.st_ino, os.get_inheritable(fd)]
sfd = os.environ.get("QEMU_CPR_EXEC_STATE")
off = os.lseek(int(sfd), 0, os.SEEK_CUR) if sfd else None
head = os.pread(int(sfd), 15, 0).decode() if sfd else None
out = sys.argv[sys.argv.index("--out") + 1]
act = sys.argv[sys.argv.index("--act") + 1]
with open("/proc/self/status") as st:
    sigblk = next(line for line in st if line.startswith("SigBlk:")).split()[1]
rec = {"t": t, "pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "fds": fds,
       "state_offset": off, "state_head": head, "env": dict(os.environ), "sigblk": sigblk}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
if act == "exit1":
    if sfd:
        os.lseek(int(sfd), 0, os.SEEK_END)
    sys.exit(1)
if act == "exit7":
    sys.exit(7)
if act == "sleep":
    time.sleep(3600)
