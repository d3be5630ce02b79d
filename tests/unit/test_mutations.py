"""The mutation list follows the code: each mutation's text is in its file exactly once, and
each test it names exists (`./run mutate` itself runs the tests; this only keeps the list from
going stale between its runs)."""

from __future__ import annotations

import re

import pytest

from tests.mutations import MUTATIONS, ROOT, Mutation


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_once_and_names_real_tests(mutation: Mutation) -> None:
    source = (ROOT / mutation.path).read_text()
    assert source.count(mutation.old) == 1, f"{mutation.name}: stale, update it with the code"
    assert mutation.new != mutation.old
    assert mutation.tests
    for node in mutation.tests:
        path, _, name = node.partition("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), node


def test_the_names_are_unique() -> None:
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
