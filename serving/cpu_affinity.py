"""Keep a vLLM CPU server's engine-core process on the cores of its OpenMP worker.

vLLM's CPU build runs the model in a worker process whose OpenMP threads are bound to
`VLLM_CPU_OMP_THREADS_BIND`, and the scheduler in an engine-core process that is bound to
nothing. Between steps the engine core waits for the worker's answer by spinning on shared
memory with `sched_yield` for up to a second after each read (vLLM's `SpinCondition`,
`busy_loop_s=1`), so while the server is busy it holds a core of its own. On a 2-core machine
that is the core the API process and the client need: the API process then takes in new
requests and hands out tokens late, and a workflow runs 13-27% slower than the engine's
steps say (docs/real-vllm.md, "Emulator fidelity"). Bound to its worker's cores, the spin
yields to the worker it is waiting for.

Linux only (`/proc`); elsewhere, or for a server that binds nothing, nothing is pinned.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ENGINE_CORE_NAME = "VLLM::EngineCor"  # `comm` keeps 15 characters of "VLLM::EngineCore"
_PROC = Path("/proc")


def parse_cpu_list(text: str | None) -> frozenset[int] | None:
    """Cores of a `VLLM_CPU_OMP_THREADS_BIND` value such as "1", "0-3" or "0,2-3".

    Returns:
        The cores; None for "auto", "nobind", an empty or a malformed value (vLLM then
        chooses or binds nothing, and so do we).
    """
    if text is None or not text.strip() or text.strip() in ("auto", "nobind", "all"):
        return None
    cores: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            first, last = int(low), int(high or low)
            if first < 0 or last < first:
                return None
            cores.update(range(first, last + 1))
    except ValueError:
        return None
    return frozenset(cores) or None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children of each of its threads, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for children in (_PROC / str(parent) / "task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in children.read_text().split()]
                found.extend(kids)
                pending.extend(kids)
    return found


def _name(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def pin_engine_cores(root_pid: int, cores: frozenset[int] | None) -> list[int]:
    """Bind every thread of each engine-core process under `root_pid` to `cores`.

    Returns:
        The engine-core processes pinned (none without `cores`, off Linux, or when the
        cores are not this machine's).
    """
    if not cores or not hasattr(os, "sched_setaffinity"):
        return []
    usable = cores & os.sched_getaffinity(0)
    if not usable:
        return []
    pinned = []
    for pid in descendants(root_pid):
        if not _name(pid).startswith(ENGINE_CORE_NAME):
            continue
        for task in (_PROC / str(pid) / "task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), usable)
        pinned.append(pid)
    return pinned
