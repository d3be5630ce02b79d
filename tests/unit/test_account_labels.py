"""A worker's own per-account metrics stay bounded: at most METRICS_TOP_ACCOUNTS accounts have
series of their own, the rest count under "(other)", and an idle account's series go."""

from __future__ import annotations

import pytest

from tasks import metrics
from tasks.metrics import OTHER, AccountLabels


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(metrics.time, "monotonic", fake)
    return fake


def _series(name: str) -> set[tuple[tuple[str, str], ...]]:
    return {
        tuple(sorted(sample.labels.items()))
        for family in metrics.SPENT.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_at_most_the_limit_of_accounts_get_their_own_label(clock: Clock) -> None:
    labels = AccountLabels(limit=3, idle_s=600)
    assert [labels.label(f"acct{n}") for n in range(5)] == [
        "acct0",
        "acct1",
        "acct2",
        OTHER,
        OTHER,
    ]
    assert labels.label("acct1") == "acct1"  # a known one keeps its own
    # 10,000 accounts: still three of their own and one aggregate.
    assert {labels.label(f"many{n}") for n in range(10_000)} == {OTHER}
    assert labels.tracked() == ["acct0", "acct1", "acct2"]


def test_an_idle_account_gives_its_place_back_and_its_series_go(clock: Clock) -> None:
    labels = AccountLabels(limit=2, idle_s=100)
    for account in ("idle-acct", "busy-acct"):
        metrics.SPENT.labels(labels.label(account)).inc(0.5)
    assert (("account", "idle-acct"),) in _series("enhance_spent_usd_total")
    assert labels.label("late-acct") == OTHER  # full
    clock.now += 60
    labels.label("busy-acct")
    clock.now += 60  # idle-acct: 120 s without activity; busy-acct: 60 s
    assert labels.label("late-acct") == "late-acct"
    assert labels.tracked() == ["busy-acct", "late-acct"]
    assert (("account", "idle-acct"),) not in _series("enhance_spent_usd_total")
    assert (("account", "busy-acct"),) in _series("enhance_spent_usd_total")
    metrics.SPENT.remove("busy-acct")
