"""The house rules the README's Layout section states, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("enhance_client", "config", "tasks", "workers")


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import in a module: (module, names imported from it)."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downwards(path: Path) -> None:
    """workers → tasks → config → enhance_client: a lower layer never imports a higher one."""
    layer = path.relative_to(ROOT).parts[0]
    above = PACKAGES[PACKAGES.index(layer) + 1 :]
    for module, _names in _imports(path):
        assert module.split(".")[0] not in above, f"{path.name} imports {module}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pydantics_validation_error_is_never_imported_by_name(path: Path) -> None:
    """`ValidationError` in this code is always tasks.errors's; pydantic's is written out."""
    for module, names in _imports(path):
        if module.startswith("pydantic"):
            assert "ValidationError" not in names, f"{path.name}: use pydantic.ValidationError"


def test_the_http_client_knows_no_limiter_or_ledger() -> None:
    """tasks/runware.py is a client: tasks in, answers and errors out."""
    imported = {module for module, _ in _imports(ROOT / "tasks" / "runware.py")}
    assert not imported & {"tasks.limiter", "tasks.ledger", "tasks.dispatcher", "tasks.base"}


def test_the_service_never_imports_the_harness() -> None:
    """The sandbox and the process launchers (workers/sandbox/) are for the demo, the tests and
    the benchmarks; only the command line (which starts them on request) and the demo use them."""
    for path in _modules():
        if "sandbox" in path.parts or path.name in {"cli.py", "demo.py"}:
            continue
        for module, _ in _imports(path):
            assert not module.startswith("workers.sandbox"), f"{path.name} imports {module}"
