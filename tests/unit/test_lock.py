"""The lock check (tests/lock.py): pyproject.toml and requirements/*.txt agree, and the check
finds each kind of disagreement when one is planted in a copy of the tree."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests import lock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of pyproject.toml and the locks, to plant disagreements in."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: the test needs updating"
    path.write_text(text.replace(old, new, 1))


def test_pyproject_and_the_locks_agree() -> None:
    assert lock.problems() == []


def test_every_lock_pins_every_package_with_hashes() -> None:
    """pip installs them with --require-hashes: a pin without a hash would stop the install."""
    for each in lock.LOCKS:
        text = (ROOT / each.path).read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert len(entries) > 10, each.path
        for entry in entries:
            assert "==" in entry.splitlines()[0], entry
            assert "--hash=sha256:" in entry, f"{each.path}: no hash in {entry.splitlines()[0]}"


def test_a_dependency_added_to_pyproject_only_is_found(tree: Path) -> None:
    assert lock.problems(tree) == []  # the control: the copy agrees before the change
    _edit(
        tree / "pyproject.toml",
        '    "requests>=2.32,<3",\n',
        '    "requests>=2.32,<3",\n    "rich>=13",\n',
    )
    found = lock.problems(tree)
    assert len(found) == 3, found  # the package is in all three install sets
    assert all("asks for rich>=13, the lock has no rich" in line for line in found), found


def test_a_dev_tool_added_to_pyproject_only_is_found_in_the_dev_locks_only(tree: Path) -> None:
    _edit(
        tree / "pyproject.toml", '    "pytest>=8,<10",\n', '    "pytest>=8,<10",\n    "tox>=4",\n'
    )
    found = lock.problems(tree)
    assert sorted(line.split(":")[0] for line in found) == [
        "requirements/dev-embedded-redis.txt",
        "requirements/dev.txt",
    ], found


def test_a_range_that_excludes_the_pinned_version_is_found(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '"redis[hiredis]>=6.1,<9"', '"redis[hiredis]>=6.1,<8"')
    found = lock.problems(tree)
    assert found
    assert all("pins redis==" in line and "outside" in line for line in found), found


def test_a_dependency_removed_from_pyproject_only_is_found(tree: Path) -> None:
    _edit(tree / "pyproject.toml", '    "prometheus-client>=0.20,<1",\n', "")
    found = lock.problems(tree)
    assert len(found) == 3, found
    assert all("prometheus-client" in line and "no longer" in line for line in found), found


def test_locks_that_pin_a_shared_package_differently_are_found(tree: Path) -> None:
    path = tree / "requirements" / "dev.txt"
    version = re.search(r"^celery==(\S+)", path.read_text(), re.M)
    assert version is not None
    _edit(path, f"celery=={version.group(1)} ", "celery==5.7.999 ")
    found = lock.problems(tree)
    assert any("dev.txt: celery ==5.7.999 but requirements/runtime.txt has" in f for f in found)


def test_the_build_backend_is_locked_as_the_build_system_asks(tree: Path) -> None:
    _edit(tree / "pyproject.toml", 'requires = ["setuptools>=69"]', 'requires = ["setuptools>=70"]')
    found = lock.problems(tree)
    assert len(found) == 1, found
    assert "[build-system] requires" in found[0]


def test_an_extra_no_lock_installs_is_found(tree: Path) -> None:
    _edit(tree / "pyproject.toml", "dev = [\n", 'profiling = ["py-spy>=0.3"]\ndev = [\n')
    assert any("extra(s) ['profiling']" in line for line in lock.problems(tree))
