"""The printed table and the Gantt chart of a benchmark run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.runner import PolicyRun
from bench.sampler import merge_intervals

LANES = (("reasoning", "GPU 0 · reasoning"), ("coder", "GPU 1 · coder"))


def format_table(report: dict[str, Any]) -> str:
    """Policies side by side, with ratios against the first policy."""
    results = report["results"]
    if not results:
        return "(no results)"
    base = results[0]
    head = (
        f"{'policy':<14} {'makespan s':>10} {'vs ' + base['policy'][:10]:>14} {'bound s':>8} {'eff':>5} "
        f"{'tasks/s':>8} {'lat mean':>9} {'p50':>8} {'p95':>8} {'busy g0':>7} {'busy g1':>7} "
        f"{'tok/s g0':>9} {'tok/s g1':>9} {'preempt':>7} {'ok/fail':>7}"
    )
    lines = [
        f"workload {report['workload']} · clock {report['clock']} · {report.get('profiles', '')}",
        head,
    ]
    for r in results:
        ratio = base["makespan_s"] / r["makespan_s"] if r["makespan_s"] else float("nan")
        bound = "-" if r["lower_bound_s"] is None else f"{r['lower_bound_s']:.1f}"
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        lines.append(
            f"{r['policy']:<14} {r['makespan_s']:>10.1f} {ratio:>13.2f}x {bound:>8} {eff:>5} "
            f"{r['tasks_per_s']:>8.3f} {r['session_latency_mean_s']:>9.1f} {r['session_latency_p50_s']:>8.1f} "
            f"{r['session_latency_p95_s']:>8.1f} {r['gpu_busy']['reasoning']:>7.0%} {r['gpu_busy']['coder']:>7.0%} "
            f"{r['tokens_per_s']['reasoning']:>9.0f} {r['tokens_per_s']['coder']:>9.0f} {r['preemptions']:>7} "
            f"{r['sessions_ok']:>3}/{r['sessions_failed']:<3}"
        )
    return "\n".join(lines)


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

