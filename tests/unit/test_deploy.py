"""deploy/ parses, matches its schemas (compose-spec, kubernetes-validate's offline ones) and
agrees with the service and with itself. No Docker, network or Redis."""

from __future__ import annotations

import ast
import json
import re
import shlex
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33"  # kubernetes-validate ships its schemas offline
METRICS, FLOWER, REDIS = 9808, 5555, 6379
SOFT_SHUTDOWN_DEFAULT_S = 30.0
MARGIN_S = 10.0  # after the soft shutdown: requeue what still runs, close connections
WORKER = "celery -A workers worker"
FLOWER_CMD = f"celery -A workers flower --port={FLOWER}"
PING = "celery -A workers inspect ping -d celery@$HOSTNAME --timeout 10"
# Not settings of the service: the pod/container name, and billiard's switch that makes SIGTERM
# start Celery's soft shutdown (as SIGQUIT does) instead of the unbounded warm one.
NON_SETTINGS = {"HOSTNAME", "REMAP_SIGTERM"}
REMAP = {"REMAP_SIGTERM": "SIGQUIT"}
# Where the worker's Prometheus metrics are declared (its /metrics on METRICS_PORT).
METRICS_MODULES = (ROOT / "workers" / "metrics.py", ROOT / "tasks" / "metrics.py")
# The dispatcher empties `celery` into the fair queues at once: its length is no backlog.
BACKLOG_METRIC = "enhance_queue_depth"
USABLE_THREADS_METRIC = "enhance_fleet_usable_threads"  # what KEDA scales the workers on

Obj = dict[str, Any]


def _load_all(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s(kind: str, name: str) -> Obj:
    found = [o for o in K8S if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _container(obj: Obj) -> Obj:
    [container] = obj["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(environment: dict[str, Any] | list[str] | None) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in (environment or {}).items()}


def _env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """Active `KEY=value` lines, and the names in commented-out `# KEY=value` examples."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in map(str.strip, path.read_text().splitlines()):
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=.*", line):
            commented.add(match[1])
    return active, commented


def _unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in map(str.strip, path.read_text().splitlines()):
        if match := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(match[1], {})
        elif line and not line.startswith(("#", ";")):
            key, _, value = (part.strip() for part in line.partition("="))
            assert key not in current, f"{path.name}: {key} set twice"
            current[key] = value
    return sections


def _unit_env(unit: dict[str, dict[str, str]]) -> dict[str, str]:
    """The unit's `Environment=` assignments (space-separated, optionally quoted)."""
    words = shlex.split(unit["Service"].get("Environment", ""))
    return dict(word.split("=", 1) for word in words)


def _seconds(text: str | int | float) -> float:
    """A compose (`1m30s`) or systemd (`90`, `1min 30s`) duration in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    part = r"(\d+(?:\.\d+)?)\s*(us|ms|sec|min|s|m|h|)\s*"
    assert re.fullmatch(f"(?:{part})+", str(text).strip()), f"not a duration: {text!r}"
    return sum(float(n) * units[unit] for n, unit in re.findall(part, str(text)))


def _docker(instruction: str) -> list[str]:
    """The arguments of every `instruction` (FROM, RUN, CMD, ...) of the Dockerfile, in order."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [value for key, value in pairs if key.upper() == instruction]


def _docker_env() -> dict[str, str]:
    """The Dockerfile's `ENV KEY=value ...` assignments."""
    words = [word for env in _docker("ENV") for word in shlex.split(env)]
    assert all("=" in word for word in words), "use the ENV KEY=value form"
    return dict(word.split("=", 1) for word in words)


def _procfile() -> dict[str, str]:
    """Procfile process types: `name: command` per line."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    pairs = [line.split(":", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): command.strip() for name, command in pairs}


YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
COMPOSE: Obj = _load_all(DEPLOY / "docker-compose.yml")[0]
SERVICES: dict[str, Obj] = COMPOSE["services"]
K8S_FILES = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
K8S = [obj for path in K8S_FILES for obj in _load_all(path)]
STANDARD = [o for o in K8S if not o["apiVersion"].startswith("keda.sh/")]
CONFIGMAP: dict[str, str] = _k8s("ConfigMap", "enhance-worker-config")["data"]
SECRET: dict[str, str] = _k8s("Secret", "enhance-worker-secrets")["stringData"]
WORKER_DEPLOY = _k8s("Deployment", "enhance-worker")
FLOWER_DEPLOY = _k8s("Deployment", "enhance-flower")
SECRET_ENV = {"enhance-worker": "RUNWARE_API_KEY", "enhance-flower": "FLOWER_BASIC_AUTH"}
UNITS = {name: _unit(DEPLOY / "systemd" / f"{name}.service") for name in SECRET_ENV}
ENV_EXAMPLE, ENV_EXAMPLE_COMMENTED = _env_file(DEPLOY / "systemd" / "env.example")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_objects(path: Path) -> None:
    docs = _load_all(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


def test_compose_matches_the_compose_spec() -> None:
    schema_file = files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [error.message for error in validator.iter_errors(COMPOSE)] == []
    assert list(validator.iter_errors({"services": {"x": {"image": "a", "bogus": 1}}}))


def test_compose_services() -> None:
    redis, worker, flower = SERVICES["redis"], SERVICES["worker"], SERVICES["flower"]
    assert redis["image"] == "redis:7"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(volume.split(":")[1] == "/data" for volume in redis["volumes"])
    for app in (worker, flower):
        build = app["build"]
        assert (DEPLOY / build["context"]).resolve() == DEPLOY.parent
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _env(worker["environment"])["RUNWARE_API_KEY"].startswith("${RUNWARE_API_KEY:?")
    assert _env(flower["environment"])["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_redis_is_persistent_and_never_evicts() -> None:
    for args in (SERVICES["redis"]["command"], _container(_k8s("StatefulSet", "redis"))["args"]):
        assert "--appendonly yes" in " ".join(args)
        assert "--maxmemory-policy noeviction" in " ".join(args)


@pytest.mark.parametrize("obj", STANDARD, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_kubernetes_object_is_valid(obj: Obj) -> None:
    assert "namespace" not in obj["metadata"]
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _exported_metrics() -> set[str]:
    """Every metric name the worker can serve: the first argument of each Counter, Gauge,
    Histogram, Summary or *MetricFamily built in METRICS_MODULES (plus the series a histogram
    or summary adds)."""
    names: set[str] = set()
    for path in METRICS_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            if kind in ("Counter", "Gauge", "Histogram", "Summary") or kind.endswith("Family"):
                names.add(first.value)
                if kind.startswith(("Histogram", "Summary")):
                    names.update(f"{first.value}{end}" for end in ("_bucket", "_sum", "_count"))
    return names


def _promql_metrics(query: str) -> set[str]:
    """The metric names a PromQL query reads: identifiers that are not a function, an aggregation
    modifier or a label (label matchers, `by (...)` lists and strings are dropped first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", query)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors: [5m]
    words = re.findall(r"(?<![\w:.])[A-Za-z_:][A-Za-z0-9_:]*(?![A-Za-z0-9_:]*\s*\()", text)
    keywords = {"bool", "offset", "and", "or", "unless", "inf", "nan"}
    return {word for word in words if word.lower() not in keywords}


def test_promql_metrics_are_read_from_a_query() -> None:
    query = 'max by (queue) (rate(a_total{queue="x(y)"}[5m])) / ignoring(queue) b + 2e3 > bool c'
    assert _promql_metrics(query) == {"a_total", "b", "c"}
    assert _promql_metrics("max(enhance_queue_depth)") == {BACKLOG_METRIC}
    assert BACKLOG_METRIC in _exported_metrics()
    assert "enhance_runware_call_duration_seconds_bucket" in _exported_metrics()
    assert "enhance_queue_length" not in _exported_metrics()


def test_keda_scales_the_worker_on_the_threads_the_fleet_can_use() -> None:
    [scaled] = [o for o in K8S if o["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert _k8s(target.get("kind", "Deployment"), target["name"]) is WORKER_DEPLOY
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    triggers = spec["triggers"]
    for trigger in triggers:  # KEDA's CRD: trigger metadata is a map of strings
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["type"]
    [prometheus] = [t for t in triggers if t["type"] == "prometheus"]
    meta = prometheus["metadata"]
    assert re.fullmatch(r"https?://[\w.-]+(:\d+)?(/\S*)?", meta["serverAddress"])
    assert float(meta["threshold"]) > 0
    # Every worker reports the same fleet-wide figure: one series per replica, so max, not sum.
    query = meta["query"]
    assert re.fullmatch(r"max\s*\(.*\)", query.strip()), query
    assert _promql_metrics(query) == {USABLE_THREADS_METRIC}
    missing = _promql_metrics(query) - _exported_metrics()
    assert missing == set(), f"not declared in workers/metrics.py or tasks/metrics.py: {missing}"
    # A `redis` list trigger, if any, reads the fleet's queue `enhance`. It is the only way to wake
    # a fleet scaled to zero (no worker then exports the metric or drains `enhance`).
    redis = [t for t in triggers if t["type"] == "redis"]
    assert len(triggers) == 1 + len(redis)
    for trigger in redis:
        meta = trigger["metadata"]
        assert meta["listName"] == "enhance"
        address = f"redis://{meta['address']}/{meta.get('databaseIndex', '0')}"
        assert address == CONFIGMAP["REDIS_URL"]
    assert spec["minReplicaCount"] >= 1 or redis


def test_kubernetes_wiring() -> None:
    kustomization = _load_all(DEPLOY / "k8s" / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == [p.name for p in K8S_FILES]
    for deploy in (WORKER_DEPLOY, FLOWER_DEPLOY):
        container, secret_env = _container(deploy), SECRET_ENV[deploy["metadata"]["name"]]
        assert container["envFrom"] == [{"configMapRef": {"name": "enhance-worker-config"}}]
        [var] = [v for v in container["env"] if "valueFrom" in v]
        ref = {"name": "enhance-worker-secrets", "key": secret_env}
        assert var == {"name": secret_env, "valueFrom": {"secretKeyRef": ref}}
        literal = {v["name"]: v["value"] for v in container["env"] if "valueFrom" not in v}
        assert literal == (REMAP if deploy is WORKER_DEPLOY else {})
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {"requests", "limits"} <= container["resources"].keys()
    assert sorted(SECRET) == sorted(SECRET_ENV.values())
    assert all("REPLACE_ME" in value for value in SECRET.values())
    assert all(ENV_EXAMPLE[name].startswith("REPLACE_ME") for name in SECRET)
    flower_labels = FLOWER_DEPLOY["spec"]["template"]["metadata"]["labels"]
    assert _k8s("Service", "enhance-flower")["spec"]["selector"].items() <= flower_labels.items()


def _is_setting(name: str) -> bool:
    fields = {field.upper() for field in Settings.model_fields}
    return name in fields or name in NON_SETTINGS or name.startswith(("FLOWER_", "PYTHON"))


def test_every_environment_variable_is_a_setting() -> None:
    k8s_env = {v["name"] for d in (WORKER_DEPLOY, FLOWER_DEPLOY) for v in _container(d)["env"]}
    sources = {
        "compose": {n for s in SERVICES.values() if "build" in s for n in _env(s["environment"])},
        "k8s ConfigMap": set(CONFIGMAP),
        "k8s Secret": set(SECRET),
        "k8s env": k8s_env,
        "env.example": set(ENV_EXAMPLE) | ENV_EXAMPLE_COMMENTED,
        "systemd Environment=": {name for unit in UNITS.values() for name in _unit_env(unit)},
    }
    for source, names in sources.items():
        assert names, source
        assert sorted(name for name in names if not _is_setting(name)) == [], source
    assert {"FLOWER_BASIC_AUTH", "RUNWARE_API_KEY"} <= ENV_EXAMPLE.keys()
    assert not _is_setting("RUNWARE_API_TOKEN")
    assert "REMAP_SIGTERM" not in ENV_EXAMPLE.keys() | ENV_EXAMPLE_COMMENTED | CONFIGMAP.keys()


def test_every_variable_named_anywhere_in_deploy_is_a_setting() -> None:
    """Also the names in comments and prose (README, YAML comments, commented-out examples): a
    setting that was removed from the service (RUNWARE_LIMIT_MAX_WAIT_S) must not be documented
    or set in deploy/. A name counts when it starts like a setting (RUNWARE_, CELERY_, ...)."""
    prefixes = sorted({field.split("_")[0].upper() for field in Settings.model_fields})
    pattern = re.compile(rf"(?<![A-Z0-9_])(?:{'|'.join(prefixes)})_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_])")
    found = {
        f"{path.relative_to(DEPLOY)}: {name}"
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.name != ".env"
        for name in pattern.findall(path.read_text())
        if not _is_setting(name)
    }
    assert sorted(found) == []
    assert pattern.fullmatch("RUNWARE_LIMIT_MAX_WAIT_S")
    assert not _is_setting("RUNWARE_LIMIT_MAX_WAIT_S")


def test_every_worker_remaps_sigterm_to_the_soft_shutdown() -> None:
    """SIGTERM from docker, the kubelet or systemd must start Celery's soft shutdown (bounded by
    WORKER_SOFT_SHUTDOWN_S), not its warm shutdown, which waits for running jobs without limit."""
    k8s_env = {v["name"]: v.get("value") for v in _container(WORKER_DEPLOY)["env"]}
    remap = {
        "Dockerfile ENV": _docker_env().get("REMAP_SIGTERM"),
        "compose worker": _env(SERVICES["worker"]["environment"]).get("REMAP_SIGTERM"),
        "k8s worker": k8s_env.get("REMAP_SIGTERM"),
        "systemd worker": _unit_env(UNITS["enhance-worker"]).get("REMAP_SIGTERM"),
    }
    assert remap == dict.fromkeys(remap, "SIGQUIT")
    worker = _procfile()["worker"]
    assert "REMAP_SIGTERM=SIGQUIT" in worker
    assert WORKER in worker
    assert worker.index("REMAP_SIGTERM=SIGQUIT") < worker.index(WORKER)


def test_every_command_is_one_of_the_services() -> None:
    commands = [" ".join(s["command"]) for s in SERVICES.values() if "build" in s]
    commands.append(" ".join(SERVICES["worker"]["healthcheck"]["test"][1:]).replace("$$", "$"))
    for deploy in (WORKER_DEPLOY, FLOWER_DEPLOY):
        commands.append(" ".join(_container(deploy)["command"]))
    probe = _container(WORKER_DEPLOY)["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"]  # a shell expands $HOSTNAME
    commands.append(probe[2])
    for unit in UNITS.values():
        program, _, args = unit["Service"]["ExecStart"].partition(" ")
        assert re.fullmatch(r"/opt/enhance-worker/\.venv/bin/(celery|enhance-worker)", program)
        commands.append(f"{Path(program).name} {args}")
    commands.extend(" ".join(json.loads(cmd)) for cmd in _docker("CMD"))
    for command in commands:
        assert command in (WORKER, FLOWER_CMD, PING) or shlex.split(command)[0] == "enhance-worker"
    assert {WORKER, FLOWER_CMD, PING} <= set(commands)
    assert commands.count(WORKER) == 4  # compose, k8s, systemd, Dockerfile


def test_ports_agree() -> None:
    worker, flower = SERVICES["worker"], SERVICES["flower"]
    worker_env = _env(worker["environment"])
    assert worker_env["METRICS_PORT"] == str(METRICS)
    assert CONFIGMAP["METRICS_PORT"] == ENV_EXAMPLE["METRICS_PORT"] == str(METRICS)
    assert worker["expose"] == [str(METRICS)]
    assert [port.rsplit(":", 1)[1] for port in flower["ports"]] == [str(FLOWER)]
    assert [port.rsplit(":", 1)[1] for port in SERVICES["redis"]["ports"]] == [str(REDIS)]
    assert _container(WORKER_DEPLOY)["ports"] == [{"name": "metrics", "containerPort": METRICS}]
    annotations = WORKER_DEPLOY["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS)
    [http] = _container(FLOWER_DEPLOY)["ports"]
    [service_port] = _k8s("Service", "enhance-flower")["spec"]["ports"]
    assert http["containerPort"] == service_port["port"] == FLOWER
    assert service_port["targetPort"] in (http["name"], FLOWER)
    [redis_port] = _k8s("Service", "redis")["spec"]["ports"]
    [redis_container_port] = _container(_k8s("StatefulSet", "redis"))["ports"]
    assert redis_port["port"] == redis_container_port["containerPort"] == REDIS
    for url in (worker_env["REDIS_URL"], CONFIGMAP["REDIS_URL"], ENV_EXAMPLE["REDIS_URL"]):
        assert re.fullmatch(rf"redis://[\w.-]+:{REDIS}/0", url)
    assert sorted(" ".join(_docker("EXPOSE")).split()) == sorted([str(FLOWER), str(METRICS)])


def _soft(env: dict[str, str]) -> float:
    return float(env.get("WORKER_SOFT_SHUTDOWN_S", SOFT_SHUTDOWN_DEFAULT_S))


def test_grace_periods_outlast_the_soft_shutdown() -> None:
    worker = SERVICES["worker"]
    compose_grace = _seconds(worker["stop_grace_period"])
    assert compose_grace > _soft(_env(worker["environment"])) + MARGIN_S
    k8s_grace = WORKER_DEPLOY["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert k8s_grace > _soft(CONFIGMAP) + MARGIN_S
    for name, unit in UNITS.items():
        assert _seconds(unit["Service"]["TimeoutStopSec"]) > _soft(ENV_EXAMPLE) + MARGIN_S, name
    assert _seconds("1m30s") == _seconds("1min 30s") == _seconds(90) == 90


def test_systemd_units() -> None:
    for name, unit in UNITS.items():
        service = unit["Service"]
        assert service["EnvironmentFile"] == "/etc/enhance-worker/env", name
        assert service["KillSignal"] == "SIGTERM", name
        assert service["Restart"] == "on-failure", name
        assert service["User"] not in ("", "root", "0"), name
        assert unit["Install"]["WantedBy"] == "multi-user.target", name


def test_dockerfile() -> None:
    assert _docker("FROM") == ["python:3.11-slim"]
    runs = _docker("RUN")
    # Exactly the lock's versions (hash-checked), then the project with nothing fetched.
    assert any("--require-hashes --no-deps -r requirements/runtime.txt" in run for run in runs)
    assert any(
        re.search(
            r"pip install --no-cache-dir --no-deps --no-build-isolation --no-index \.(\s|$)", run
        )
        for run in runs
    )
    [*_, user] = _docker("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert [json.loads(cmd) for cmd in _docker("CMD")] == [shlex.split(WORKER)]


def test_the_sentinel_override_wires_every_app_to_the_sentinels() -> None:
    override = _load_all(DEPLOY / "docker-compose.sentinel.yml")[0]
    schema_file = files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [error.message for error in validator.iter_errors(override)] == []
    services = override["services"]
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    monitor = re.search(
        r"sentinel monitor (\S+) (\S+) (\d+) (\d+)", services[sentinels[0]]["command"][2]
    )
    assert monitor is not None
    group, primary, port, quorum = monitor.groups()
    assert (primary, int(port), int(quorum)) == ("redis", REDIS, 2)  # the base file's redis
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis", str(REDIS)]
    for app in ("worker", "flower"):
        env = _env(services[app]["environment"])
        assert env["REDIS_URL"] == ";".join(f"sentinel://{s}:26379/0" for s in sentinels)
        assert env["REDIS_SENTINEL_MASTER"] == group
        Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
        assert app in SERVICES  # an override of the base file's service


def test_the_env_example_is_generated_from_the_settings() -> None:
    """`./run docs` writes it; a setting added, renamed or re-defaulted without it fails here."""
    from config.reference import env_example

    assert (DEPLOY / "systemd" / "env.example").read_text() == env_example()


def _docs() -> str:
    """The README and every document beside it (docs/, CONTRIBUTING.md)."""
    paths = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(path.read_text() for path in paths)


def _readme_defaults() -> dict[str, str]:
    """{variable: default} from every table row of the docs that starts with settings' names."""
    found: dict[str, str] = {}
    text = _docs()
    for names, values in re.findall(r"^\| ((?:`[A-Z_0-9]+`(?:, )?)+) \| ([^|]*) \|", text, re.M):
        variables = re.findall(r"`([A-Z_0-9]+)`", names)
        cells = [v.strip().strip("`") for v in values.split(",")]
        if len(cells) != len(variables):
            cells = [values.strip().strip("`")] * len(variables)
        found.update(zip(variables, cells, strict=True))
    return found


def test_the_readme_tables_give_the_code_s_defaults() -> None:
    from config.reference import defaults

    code, readme = defaults(), _readme_defaults()
    assert len(readme) > 40
    for variable, shown in readme.items():
        assert variable in code, f"README documents {variable}, which is not a setting"
        if shown in {"none", "unset"}:
            assert code[variable] == "", variable
        elif re.fullmatch(r"[A-Z_0-9]+|.* .*", shown) is None:  # a literal, not "REDIS_URL"
            assert shown == code[variable], f"README says {variable}={shown}: {code[variable]}"
    undocumented = set(code) - readme.keys() - set(re.findall(r"[A-Z_0-9]{6,}", _README))
    assert undocumented == set()


_README = _docs()


def test_the_image_copies_every_package_the_project_installs() -> None:
    """Each package of pyproject.toml's list is copied into the image before the install (a
    package left out installs nothing, and the worker fails at import)."""
    import tomllib

    packages = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    copied = {shlex.split(args)[0] for args in _docker("COPY")}
    assert set(packages) <= copied, set(packages) - copied
