"""The autoscaling signal (workers/metrics.py): the worker threads the fleet can keep busy."""

from __future__ import annotations

import pytest

from tasks.metrics import RUNWARE_LATENCY
from workers.metrics import CALL_DURATION, RecentCalls, usable_threads


@pytest.mark.parametrize(
    ("rate", "call_s", "cap", "work", "expected"),
    [
        # The case: 6,000 jobs behind 80 calls/s of 0.3 s: 24 threads, not 6,000.
        (80.0, 0.3, 0, 6000, 24),
        (80.0, 0.3, 12, 6000, 12),  # the in-flight cap binds first
        (80.0, 0.3, 0, 10, 10),  # fewer jobs than the rate could take
        (80.0, 0.3, 0, 0, 0),  # nothing to do: no thread
        (0.0, 0.3, 0, 6000, 6000),  # no rate and no cap: every job
        (0.0, 0.3, 40, 6000, 40),
        (1.0, 0.05, 0, 500, 1),  # a slow rate of quick calls: one thread
        (10.0, 2.5, 0, 500, 25),  # slower calls need more threads at the same rate
    ],
)
def test_usable_threads(rate: float, call_s: float, cap: int, work: int, expected: int) -> None:
    assert usable_threads(rate, call_s, cap, work) == expected


def test_recent_calls_is_the_mean_since_the_last_read() -> None:
    recent = RecentCalls()
    recent.read()  # whatever this process called before
    for seconds in (0.2, 0.4):
        RUNWARE_LATENCY.labels("promptEnhance").observe(seconds)
    assert recent.read() == pytest.approx(0.3)
    assert recent.read() == pytest.approx(0.3)  # no call since: the last value known
    RUNWARE_LATENCY.labels("imageInference").observe(3.0)
    assert recent.read() == pytest.approx(3.0)


def test_no_figure_before_the_first_call() -> None:
    """A fresh worker (or a prefork parent reading no child yet) reports no usable threads
    rather than a guess: with KEDA's max() a guessed 1 s would outweigh the measured ones."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    fresh = Histogram(
        CALL_DURATION.removesuffix("_seconds"),
        "d",
        ["task_type"],
        registry=registry,
        unit="seconds",
    )
    recent = RecentCalls(registry.collect)
    assert recent.read() is None
    fresh.labels("promptEnhance").observe(0.5)
    assert recent.read() == pytest.approx(0.5)
