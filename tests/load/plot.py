"""PNG plots for the benchmarks (`--plot FILE.png`): tasks per second that Runware (the
sandbox) accepted, over time, one line per account, with the limits drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def per_second(times: Sequence[float], start: float, end: float, bin_s: float) -> list[float]:
    """How many of `times` fall in each `bin_s` window from `start` to `end`, per second."""
    bins = [0] * max(1, int((end - start) / bin_s) + 1)
    for moment in times:
        index = int((moment - start) / bin_s)
        if 0 <= index < len(bins):
            bins[index] += 1
    return [count / bin_s for count in bins]


def plot_rates(
    path: str | Path,
    title: str,
    series: Mapping[str, Sequence[float]],
    limits: Mapping[str, float] | None = None,
    bin_s: float = 1.0,
) -> Path:
    """Draw each series (label -> accepted times, epoch s) as tasks per second against seconds
    since the first of them, and each limit (label -> tasks/s) as a dashed line; write PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    moments = [t for times in series.values() for t in times]
    start, end = min(moments), max(moments)
    figure, axes = plt.subplots(figsize=(10, 4.5), dpi=110)
    peak = max((limits or {}).values(), default=1.0)
    for label, times in series.items():
        if not times:
            continue
        rates = per_second(times, start, end, bin_s)
        peak = max(peak, *rates)
        seconds = [index * bin_s for index in range(len(rates))]
        axes.step(seconds, rates, where="post", label=f"{label} ({len(times)} tasks)")
    for label, value in (limits or {}).items():
        axes.axhline(value, linestyle="--", linewidth=1.2, color="black", alpha=0.7)
        axes.annotate(label, (0, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("seconds since the first accepted task")
    axes.set_ylabel(f"tasks accepted per second ({bin_s:g} s bins)")
    axes.set_title(title)
    axes.set_ylim(0, peak * 1.35)  # room above the lines for the legend
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, format="png")
    plt.close(figure)
    return target


def numbered(path: str | Path, tag: str, several: bool) -> Path:
    """`path`, or with `-tag` before its suffix when one run writes several plots."""
    target = Path(path)
    return target.with_name(f"{target.stem}-{tag}{target.suffix}") if several else target
