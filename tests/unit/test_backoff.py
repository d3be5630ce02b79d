"""The retry back-off: full jitter under a capped exponential, never before Retry-After."""

from __future__ import annotations

from tasks.policy import backoff_seconds


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    for retries in range(8):
        ceiling = min(30.0, 1.0 * 2**retries)
        delays = [backoff_seconds(retries, 1.0, 30.0, None, 300.0) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads the delays over the whole range, not around one value.
        assert max(delays) - min(delays) > ceiling / 2


def test_retry_after_is_a_floor_even_above_the_cap_but_is_bounded() -> None:
    assert all(backoff_seconds(0, 1.0, 30.0, 7.0, 300.0) >= 7.0 for _ in range(50))
    assert all(backoff_seconds(0, 1.0, 5.0, 45.0, 300.0) == 45.0 for _ in range(50))
    assert all(backoff_seconds(0, 1.0, 30.0, 36_000.0, 300.0) == 300.0 for _ in range(50))
