"""No garbage collection while a guest is paused.

CPython collects its youngest generation every 700 allocations: in the agent's process that
took 0.2-0.3 ms, and one fell inside the pause of every one of 20 cpr-exec updates measured
(the CLI, 256 MiB; a full collection there takes 15-30 ms). A mode's run, the pause and the
few QMP round trips around it, allocates little, so the collector is held off while it runs;
reference counting still frees whatever is not in a cycle. Counted, so that operations
running at once (the gRPC service) share the hold, and the collector comes back as it was
found.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_holders = 0
_was_enabled = True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The collector off while the body runs (and while any other holder's body runs)."""
    global _holders, _was_enabled
    if _holders == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _holders += 1
    try:
        yield
    finally:
        _holders -= 1
        if _holders == 0 and _was_enabled:
            gc.enable()
