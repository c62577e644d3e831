"""The README's Python example runs as written, on the virtual clock of the built-in emulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_BLOCK_RE = re.compile(r"^From Python.*?^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _example() -> str:
    match = _BLOCK_RE.search((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert match, "README.md has no ```python block after 'From Python'"
    return match.group(1)


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example(), encoding="utf-8")
    workspace = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(PYTHONPATH=str(REPO_ROOT), TANDEM_WORKSPACE=str(workspace))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    status, output_dir = done.stdout.split()[-2:]
    assert status in ("ok", "partial")
    assert Path(output_dir) == workspace / "s1"
    manifest = json.loads((workspace / "s1" / "manifest.json").read_text())
    assert manifest["status"] == status and manifest["review_on"] == "coder"
    # Reported, not asserted: the emulated time is virtual, the wall time is this machine's.
    print(f"README example: {wall_s:.1f} s wall, emulated timings {manifest['timings_s']}")
