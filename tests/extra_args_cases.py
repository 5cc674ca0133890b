"""The bad ``target.extraArgs`` every layer must refuse: admission (CEL on the real API
server), the agent's request validation (the real gRPC server) and preflight. One table, so
the three tests cannot drift apart; each row is (id, arguments, why it is dangerous)."""

from __future__ import annotations

BAD_EXTRA_ARGS: list[tuple[str, list[str], str]] = [
    ("qmp-tcp", ["-qmp", "tcp:0.0.0.0:4444,server=on,wait=off"],
     "an unauthenticated monitor on the network; migrate exec: is root on the host"),
    ("qmp-double-dash", ["--qmp", "tcp:0.0.0.0:4444,server=on,wait=off"], "the same, spelled --"),
    ("monitor", ["-monitor", "tcp:0.0.0.0:4445,server=on,wait=off"], "an HMP monitor"),
    ("object-secret-file", ["-object", "secret,id=s0,file=/etc/shadow"], "reads a host file"),
    ("object-filter-dump", ["-object", "filter-dump,id=f0,netdev=n0,file=/etc/cron.d/x"],
     "writes a host file"),
    ("chardev-socket", ["-chardev", "socket,id=c0,path=/run/x.sock,server=on,wait=off"],
     "a socket on the host"),
    ("readconfig", ["-readconfig", "/etc/qemu-evil.cfg"], "a whole config file"),
    ("add-fd", ["-add-fd", "fd=3,set=1"], "hands an inherited descriptor to the guest"),
    ("sandbox-off", ["-sandbox", "off"], "drops the seccomp filter"),
    ("run-with", ["-run-with", "user=root,chroot=/"], "changes the process's user and root"),
    ("incoming", ["-incoming", "defer"], "the agent's own option"),
    ("daemonize", ["-daemonize"], "the agent's own option; a lone flag"),
    ("log-file", ["-D", "/etc/ld.so.preload"], "writes a host file"),
    ("msg-without-value", ["-msg"], "an allowed option missing its value"),
    ("msg-bad-value", ["-msg", "timestamp=on,file=/tmp/x"], "an allowed option, bad value"),
    ("allowed-then-qmp", ["-msg", "timestamp=on", "-qmp", "unix:/tmp/q.sock,server=on"],
     "a bad pair after a good one"),
    ("value-as-option", ["-msg", "-qmp", "tcp:0.0.0.0:4444"], "an option smuggled as a value"),
    ("bare-word", ["timestamp=on"], "a bare word is a disk image to QEMU"),
]

GOOD_EXTRA_ARGS: list[list[str]] = [
    [],
    ["-msg", "timestamp=on"],
    ["-msg", "timestamp=on,guest-name=on"],
    ["-msg", "guest-name=off", "-msg", "timestamp=off"],
]
