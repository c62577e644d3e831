"""`python -m serving.emulator.calibration [--markdown]`: every point, published vs emulated."""

from __future__ import annotations

import argparse

from serving.emulator.calibration import load_all, markdown_table, measured, rows, shape, unit
from serving.emulator.profiles import PROFILES


def main(argv: list[str] | None = None) -> int:
    """Print each calibration point with the emulator's prediction; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.emulator.calibration",
        description="Run every H100 profile's calibration points through the emulator.",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    table = rows(PROFILES, load_all())
    if args.markdown:
        print(markdown_table(table))
        return 0
    for r in table:
        gap = f"  [engine gap: {r.point.engine_gap}]" if r.point.engine_gap else ""
        print(
            f"{r.profile:24s} {shape(r.point):34s} {measured(r.point):10.2f} "
            f"{r.predicted:10.2f} {unit(r.point):5s} {r.error:+7.1%}{gap}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
