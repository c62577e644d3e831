"""The report of a benchmark run: one lower bound per workload run, means over seeds, the
printed table (grouped by review placement) and the Gantt chart."""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bench.runner import PolicyRun
from bench.sampler import merge_intervals

LANES = (("reasoning", "GPU 0 · reasoning"), ("coder", "GPU 1 · coder"))
# Per-seed figures kept in each result's `per_seed` list.
PER_SEED_FIELDS = (
    "makespan_s", "lower_bound_s", "efficiency", "lower_bound_own_s", "efficiency_own",
    "tasks_per_s", "session_latency_mean_s", "session_latency_p50_s", "session_latency_p95_s",
    "gpu_busy", "gpu_saturation", "tokens_per_s", "review_share", "review_calls", "stage_s",
    "preemptions", "requests", "sessions_ok", "sessions_failed", "files_ok",
    "prefix_cache_hit_rate", "prefix_shareable_hit_share",
)  # fmt: skip
SPREAD_FIELDS = ("makespan_s", "session_latency_mean_s", "session_latency_p95_s")


def common_bound(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The one lower bound of a workload run: the lowest candidate over the policies run.

    Each policy's requests give three candidates: its own bound (its actual review
    placement; for review_on=auto the mix it ran) and its bound with every review on the
    reasoning model and on the coder. Including each own bound keeps every efficiency <= 1.

    Returns:
        `{"lower_bound_s", "policy", "review_on"}` of the lowest candidate (review_on "auto"
        for an auto policy's own mix), or None when no policy has a bound (real servers).
    """
    best: dict[str, Any] | None = None
    for record in records:
        parts = record.get("lower_bound_parts")
        if not parts:
            continue
        candidates = [(review_group(record), parts["lower_bound_s"])]
        candidates += [(k, v["lower_bound_s"]) for k, v in parts.get("by_review_on", {}).items()]
        for where, bound in candidates:
            if best is None or bound < best["lower_bound_s"]:
                best = {"lower_bound_s": bound, "policy": record["policy"], "review_on": where}
    return best


def apply_common_bound(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Set every record's `lower_bound_s` and `efficiency` to the run's common bound."""
    bound = common_bound(records)
    if bound is None:
        return None
    for record in records:
        record["lower_bound_s"] = bound["lower_bound_s"]
        record["efficiency"] = round(bound["lower_bound_s"] / max(record["makespan_s"], 1e-9), 4)
    return bound


def _mean(values: Sequence[Any]) -> Any:
    """The mean of equally shaped values: numbers averaged, dicts per key, the rest the first."""
    first = values[0]
    if all(v == first for v in values):
        return first
    if all(isinstance(v, dict) for v in values):
        return {k: _mean([v.get(k) for v in values]) for k in first}
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) == len(values):
        return round(statistics.fmean(numbers), 4)
    return first


def aggregate_seeds(per_seed: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One policy's result over seeds: every field the mean, plus `spread` and `per_seed`.

    Args:
        per_seed: `(seed, result record)` for each seed, in order.
    """
    records = [record for _seed, record in per_seed]
    out: dict[str, Any] = {k: _mean([r[k] for r in records]) for k in records[0]}
    out["spread"] = {
        name: {
            "mean": round(statistics.fmean(r[name] for r in records), 4),
            "min": min(r[name] for r in records),
            "max": max(r[name] for r in records),
        }
        for name in SPREAD_FIELDS
    }
    out["per_seed"] = [
        {"seed": seed, **{k: record[k] for k in PER_SEED_FIELDS}} for seed, record in per_seed
    ]
    return out


def review_group(result: dict[str, Any]) -> str:
    """The table group of a result: its review placement."""
    return str(result.get("review_on", "reasoning"))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _with_spread(result: dict[str, Any], name: str, seeds: int) -> str:
    text = f"{result[name]:.1f}"
    spread = result.get("spread", {}).get(name)
    if seeds > 1 and spread:
        text += f" ({spread['min']:.1f}-{spread['max']:.1f})"
    return text


def _pair(values: dict[str, Any] | None, spec: str) -> str:
    if not values:
        return "-"
    return " / ".join(_fmt(values.get(role), spec) for role, _ in LANES)


def _stages(stage_s: dict[str, float] | None) -> str:
    if not stage_s:
        return "-"
    return " / ".join(f"{stage_s[k]:.1f}" for k in ("plan", "code", "review"))


def _review_cell(result: dict[str, Any]) -> str:
    share = result.get("review_share")
    if review_group(result) != "auto" or not share:
        return review_group(result)
    return f"auto r {share['reasoning']:.0%} / c {share['coder']:.0%}"


def _table(report: dict[str, Any]) -> Table:
    seeds = len(report.get("seeds", [report.get("seed", 0)]))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    columns = (
        ("policy", "left"), ("review on", "left"), ("makespan s", "right"), ("ratio", "right"),
        ("bound s", "right"), ("eff", "right"), ("eff own", "right"),
        ("lat mean s", "right"), ("lat p95 s", "right"), ("plan/code/review s", "right"),
        ("busy g0/g1", "right"), ("sat g0/g1", "right"), ("tok/s g0/g1", "right"),
        ("preempt", "right"), ("ok/fail", "right"),
        ("pfx hit g0/g1", "right"), ("pfx share g0/g1", "right"),
    )  # fmt: skip
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    results = report["results"]
    # Groups in the order their first policy was given.
    for group in dict.fromkeys(review_group(r) for r in results):
        members = [r for r in results if review_group(r) == group]
        if not members:
            continue
        base = members[0]
        table.add_row(f"review on {group}", "", "", f"vs {base['policy']}", style="bold")
        for r in members:
            ratio = base["makespan_s"] / r["makespan_s"] if r["makespan_s"] else float("nan")
            table.add_row(
                r["policy"], _review_cell(r), _with_spread(r, "makespan_s", seeds),
                f"{ratio:.2f}x", _fmt(r["lower_bound_s"], ".1f"), _fmt(r["efficiency"], ".2f"),
                _fmt(r.get("efficiency_own"), ".2f"),
                _with_spread(r, "session_latency_mean_s", seeds),
                _with_spread(r, "session_latency_p95_s", seeds), _stages(r.get("stage_s")),
                _pair(r["gpu_busy"], ".0%"), _pair(r.get("gpu_saturation"), ".0%"),
                _pair(r["tokens_per_s"], ".0f"), f"{r['preemptions']:g}",
                f"{r['sessions_ok']:g}/{r['sessions_failed']:g}",
                _pair(r.get("prefix_cache_hit_rate"), ".0%"),
                _pair(r.get("prefix_shareable_hit_share"), ".0%"),
            )  # fmt: skip
        table.add_section()
    return table


def _header(report: dict[str, Any]) -> list[str]:
    profiles = report.get("profiles", "")
    if isinstance(profiles, dict):
        profiles = " + ".join(f"{role} {name}" for role, name in profiles.items())
    seeds = report.get("seeds", [report.get("seed", 0)])
    lines = [
        f"workload {report['workload']} · {report.get('sessions')} x "
        f"{report.get('tasks_per_session')} files · clock {report['clock']} · {profiles}",
        "seeds "
        + ", ".join(str(s) for s in seeds)
        + (" (figures: mean, (min-max) over seeds)" if len(seeds) > 1 else ""),
    ]
    bound = report.get("lower_bound")
    if bound:
        lines.append(
            f"bound: {report['lower_bound_s']:.1f} s, the lowest over review placements and "
            f"policies (seed {seeds[0]}: {bound[0]['policy']}'s requests, review on "
            f"{bound[0]['review_on']}); eff = bound / makespan; eff own = own bound / makespan"
        )
    lines.append(
        "busy: share of time with at least one sequence running; sat: generated tokens / "
        "saturated decode capacity (docs/benchmark.md); ratio: group's first / makespan"
    )
    lines.append(
        "pfx hit: servers' prefix-cache hit tokens / queried tokens; pfx share: share of the "
        "shareable prefix tokens served from cache (bench/runner.py)"
    )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """Policies side by side, grouped by review placement, as plain text.

    Each group (review on reasoning, coder, auto) has its own baseline for the ratio column:
    its first policy in the order given. No column is cut: the text is as wide as the table.
    """
    if not report["results"]:
        return "(no results)"
    table = _table(report)
    console = Console(width=400, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    body = [line.rstrip() for line in console.export_text(styles=False).splitlines()]
    return "\n".join([*_header(report), *body]).rstrip()


def plot_gantt(runs: Sequence[PolicyRun], path: str, title: str) -> None:
    """One panel per policy; in each, a lane per GPU with one thin row per session."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sessions = sorted({s.session_id for run in runs for s in run.sessions})
    cmap = plt.get_cmap("tab20" if len(sessions) > 10 else "tab10")
    colour = {sid: cmap(i % cmap.N) for i, sid in enumerate(sessions)}
    horizon = max((run.makespan_s for run in runs), default=1.0)
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    panel_h = 1.0 + 0.32 * len(sessions)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.6 * cols, panel_h * rows + 1.0), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(runs) :]:
        ax.set_visible(False)
    n = len(sessions)
    for ax, run in zip(axes.flat, runs, strict=False):
        spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for span in run.spans:
            key = (span.role, span.session_id)
            spans.setdefault(key, []).append((span.start_s - run.t0, span.end_s - run.t0))
        yticks, ylabels = [], []
        for lane_index, (role, label) in enumerate(LANES):
            top = lane_index * (n + 1)
            for row, sid in enumerate(sessions):
                bars = [(a, b - a) for a, b in merge_intervals(spans.get((role, sid), []))]
                if bars:
                    ax.broken_barh(bars, (top + row, 0.85), facecolors=colour[sid])
            yticks.append(top + n / 2)
            ylabels.append(label)
            ax.axhline(top + n + 0.45, color="#bbb", lw=0.6)
        ax.set_yticks(yticks, ylabels)
        ax.set_xlim(0, horizon * 1.02)
        ax.set_ylim(-0.5, 2 * (n + 1))
        ax.invert_yaxis()
        result = run.result()
        busy = result["gpu_busy"]
        ax.set_title(
            f"{run.policy.name}\nmakespan {run.makespan_s:.1f} s · busy {busy['reasoning']:.0%} / {busy['coder']:.0%}",
            fontsize=9,
        )
        ax.set_xlabel("seconds")
    if len(sessions) <= 16:
        fig.legend(
            handles=[Patch(color=colour[s], label=s) for s in sessions],
            loc="lower center",
            ncol=min(8, len(sessions)),
            fontsize=7,
            frameon=False,
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if len(sessions) <= 16 else 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
