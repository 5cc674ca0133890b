"""Named points of an update where the agent stops itself, for the fault tests.

Some faults matter at one exact point, where the agent is only a fraction of a millisecond
away from the next step (cpr-exec: the guard was sent the commit, the `cont` is next). A test
that freezes the agent from outside, on the event stream, lands after that step. With
`VMUPDATE_AGENT_STOP_AT=<point>[,<point>...]` in its environment the agent sends itself
SIGSTOP the first time it reaches each named point; the test acts on the frozen agent
(kills the new QEMU, kills the agent) and lets it go on with SIGCONT.

Only the environment of the agent's own process sets this, which is whoever starts the
agent (root on the host); nothing a user sends reaches it. The chart never sets it.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "VMUPDATE_AGENT_STOP_AT"

#: The points: where they are, and what the agent has done when it stops there.
POINTS = {
    "cpr-exec:execed": "cpr-exec, QEMU saved its state and exec'd (the guard, then the new "
                       "QEMU); the agent has not reconnected yet",
    "cpr-transfer:transferred": "cpr-transfer, the new QEMU holds the whole state, checked "
                                "and paused; the old one is stopped (the `cont` is next)",
    "cpr-transfer:resumed": "cpr-transfer, the guest runs in the new QEMU; the old one is not "
                            "quit yet",
    "cpr-exec:committed": "cpr-exec, the new QEMU loaded and verified, the guard was sent "
                          "the commit; the guest is still paused (the `cont` is next)",
}


def armed_from(environ: dict[str, str] | os._Environ[str]) -> set[str]:
    """The points named in the environment; an unknown name is an error (a typo would make
    a fault test pass without reaching its point)."""
    names = {n.strip() for n in environ.get(ENV, "").split(",") if n.strip()}
    unknown = names - POINTS.keys()
    if unknown:
        raise ValueError(f"{ENV}: unknown point(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(POINTS))}")
    return names


_armed: set[str] | None = None


def reached(point: str) -> None:
    """Stop here (SIGSTOP to this process) if `point` is armed; once per process."""
    global _armed
    if _armed is None:
        _armed = armed_from(os.environ)
    if point not in _armed:
        return
    _armed.discard(point)
    log.warning("fault point %s reached: stopping (%s)", point, POINTS[point])
    os.kill(os.getpid(), signal.SIGSTOP)
