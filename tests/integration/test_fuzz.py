"""Arbitrary JSON sent by name at the worker boundary: the worker never crashes, never sends
Runware an invalid request, and every job ends SUCCESS or a FAILURE that names the problem."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningWorker
from workers.sandbox import Sandbox

FIELDS = [
    "prompt",
    "promptMaxLength",
    "promptVersions",
    "taskUUID",
    "deliveryMethod",
    "webhookURL",
    "account",
    "model",
    "includeCost",
    "extra",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=400),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=5,
)
plausible = st.fixed_dictionaries(
    {"prompt": st.text(min_size=0, max_size=320)},
    optional={
        "promptMaxLength": st.integers(0, 500) | json_values,
        "promptVersions": st.integers(-1, 7) | json_values,
        "deliveryMethod": st.sampled_from(["sync", "async", "push"]) | json_values,
        "taskUUID": st.uuids(version=4).map(str) | st.uuids().map(str) | json_values,
    },
)
arbitrary = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=5)
EXPLAINED = (
    "invalid enhance_prompt request: ",
    "tasks.enhance_prompt takes keyword arguments only",
)
jobs = st.lists(
    st.tuples(st.lists(json_values, max_size=2), plausible | arbitrary), min_size=10, max_size=20
)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=jobs)
def test_arbitrary_arguments_never_crash_the_worker(
    main_worker: RunningWorker, sandbox: Sandbox, batch: list[tuple[list[Any], dict[str, Any]]]
) -> None:
    pending = [
        main_worker.app.send_task("tasks.enhance_prompt", args=args, kwargs=kwargs)
        for args, kwargs in batch
    ]
    unexplained = []
    for async_result, (args, kwargs) in zip(pending, batch, strict=True):
        try:
            value = async_result.get(timeout=60)
        except Exception as exc:
            explained = str(exc).startswith(EXPLAINED) and async_result.state == "FAILURE"
            if not explained:
                unexplained.append(f"{type(exc).__name__}: {exc} for {args!r} {kwargs!r}")
        else:
            assert not args
            assert value["prompt"] == kwargs["prompt"]
    assert unexplained == []
    # Runware never saw a request it would refuse.
    assert sandbox.state.statuses.get("400", 0) == 0
    assert main_worker.process.process is not None
    assert main_worker.process.process.poll() is None
