"""A CPU server's engine core is bound to its OpenMP cores: parsing and a real process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cpu_affinity import ENGINE_CORE_NAME, descendants, parse_cpu_list, pin_engine_cores

LINUX = Path("/proc/self/task").is_dir() and hasattr(os, "sched_setaffinity")


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("1", {1}),
        ("0-3", {0, 1, 2, 3}),
        ("0,2-3", {0, 2, 3}),
        (" 4 ", {4}),
        ("auto", None),
        ("nobind", None),
        ("", None),
        (None, None),
        ("3-1", None),
        ("a-b", None),
        ("-1", None),
    ],
)
def test_bind_values_parse_to_cores_or_to_none(text: str | None, cores: set[int] | None) -> None:
    assert parse_cpu_list(text) == (None if cores is None else frozenset(cores))


# A grandchild that names itself as vLLM's engine core does (prctl PR_SET_NAME), with a second
# thread, beside a sibling with another name; both start on every core.
_TREE = f"""
import ctypes, subprocess, sys, threading, time
engine = '''
import ctypes, threading, time
ctypes.CDLL(None).prctl(15, b"{ENGINE_CORE_NAME}", 0, 0, 0)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
'''
other = "import time; print('ready', flush=True); time.sleep(60)"
kids = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        for code in (engine, other)]
for kid in kids:
    kid.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not LINUX, reason="needs /proc and sched_setaffinity")
def test_only_the_engine_core_under_the_server_is_pinned_with_all_its_threads() -> None:
    core = min(os.sched_getaffinity(0))
    root = subprocess.Popen(
        [sys.executable, "-c", _TREE], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert root.stdout is not None and root.stdout.readline().strip() == b"ready"
        below = descendants(root.pid)
        assert len(below) == 2, below
        pinned = pin_engine_cores(root.pid, frozenset({core}))
        assert len(pinned) == 1
        (engine,) = pinned
        threads = list(Path(f"/proc/{engine}/task").iterdir())
        assert len(threads) >= 2
        for task in threads:
            assert os.sched_getaffinity(int(task.name)) == {core}
        (other,) = set(below) - {engine}
        assert os.sched_getaffinity(other) == os.sched_getaffinity(0)
        # Nothing to bind, or cores this machine does not have: nothing is pinned.
        assert pin_engine_cores(root.pid, None) == []
        assert pin_engine_cores(root.pid, frozenset({10_000})) == []
    finally:
        os.killpg(root.pid, signal.SIGKILL)  # the whole tree, as `stop_server` does
        root.wait(timeout=10)
