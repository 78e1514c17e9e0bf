"""docker-compose.yml, the Dockerfile and the collector config, checked structurally.

No container engine runs in the test environment, so these read the files and check that
the pieces fit: every mounted file exists, every address one service uses is a service of the
stack listening on that port, images are pinned, health checks gate the start order, and no
secret is written down.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.ops.tools import (
    ALERTMANAGER_CONFIG,
    COLLECTOR_CONFIG,
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    JAEGER_CONFIG,
    PROMETHEUS_CONFIG,
    ROOT,
)

SERVICE = "salon-reports"
REQUIRED_SERVICES = {
    SERVICE,
    "postgres",
    "redis",
    "otel-collector",
    "jaeger",
    "prometheus",
    "alertmanager",
    "grafana",
}
# Images without a shell or HTTP client to run a health check with, and why.
NO_HEALTHCHECK = dict.fromkeys(
    ("otel-collector", "otel-gateway", "otel-sampler"),
    "otel/opentelemetry-collector-contrib is FROM scratch",
)
# docs/operations.md, "The stack": what `docker compose up` serves on the host.
PUBLISHED = {SERVICE: 8000, "jaeger": 16686, "grafana": 3000, "prometheus": 9090}


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def collector() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    return document


def listening_ports(name: str) -> set[int]:
    """Container ports a compose service exposes to the others (expose + published)."""
    service = services()[name]
    ports = {int(str(port).split("/")[0]) for port in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).split(":")[-1].split("/")[0]))
    return ports


def endpoint(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``scheme://host:port/...``."""
    parsed = urlsplit(address if "//" in address else f"//{address}")
    assert parsed.hostname, f"no host in {address!r}"
    assert parsed.port, f"no port in {address!r}"
    return parsed.hostname, parsed.port


def service_running(image_prefix: str, profile: str | None = None) -> str:
    """The one service of ``profile`` (None: of the default stack) running that image."""
    names = [
        name
        for name, s in services().items()
        if s.get("image", "").startswith(image_prefix)
        and (profile in s.get("profiles", []) if profile else not s.get("profiles"))
    ]
    assert len(names) == 1, f"expected one service running {image_prefix}, found {names}"
    return names[0]


def environment(name: str) -> dict[str, str]:
    env = services()[name].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def expand(value: str, variables: dict[str, str] | None = None) -> str:
    """``value`` with compose's ``${NAME:-default}`` substituted from ``variables``."""
    given = variables or {}
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: given.get(m.group(1)) or m.group(2), value)


def scrape_targets(config: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """(host, port) per Prometheus job: static targets, and DNS names with their port."""
    targets: dict[str, list[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        found = [endpoint(t) for sc in job.get("static_configs", []) for t in sc["targets"]]
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A", job["job_name"]
            found += [(name, int(sd["port"])) for name in sd["names"]]
        targets[job["job_name"]] = found
    return targets


# -- compose ------------------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    assert set(services()) >= REQUIRED_SERVICES


@pytest.mark.parametrize("name", sorted(REQUIRED_SERVICES | {"pager"}))
def test_images_are_pinned(name: str) -> None:
    image = services()[name].get("image", "")
    assert ":" in image, f"{name}: image {image!r} has no tag"
    tag = image.rsplit(":", 1)[1]
    assert re.match(r"v?\d+\.\d+", tag), f"{name}: tag {tag!r} is not pinned"


def test_major_versions_asked_for() -> None:
    assert services()["postgres"]["image"].startswith("postgres:15.")
    assert services()["redis"]["image"].startswith("redis:7.")
    assert services()["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    assert services()["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")


@pytest.mark.parametrize("name", sorted(REQUIRED_SERVICES | {"pager"}))
def test_health_checks(name: str) -> None:
    healthcheck = services()[name].get("healthcheck")
    if name in NO_HEALTHCHECK:
        assert healthcheck is None
        return
    assert healthcheck, f"{name} has no health check"
    assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}


def test_start_order_waits_for_health() -> None:
    for name, service in services().items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dependency, spec in depends.items():
            assert dependency in services(), f"{name} depends on unknown {dependency}"
            expected = "service_started" if dependency in NO_HEALTHCHECK else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dependency}: {spec}"
    depends = services()[SERVICE]["depends_on"]
    assert {"postgres", "redis"} <= set(depends)


def test_every_mounted_file_exists() -> None:
    mounts = 0
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                mounts += 1
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in compose().get("volumes", {}), f"{name}: undeclared {source}"
    assert mounts >= 6


def test_service_environment() -> None:
    env = environment(SERVICE)
    assert env["OTEL_SERVICE_NAME"] == "salon-reports"
    assert env["REPORTS_ENVIRONMENT"] == "production"
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert endpoint(env["DATABASE_URL"].split("@", 1)[1])[0] == "postgres"
    assert endpoint(env["DATABASE_URL"].split("@", 1)[1])[1] in {5432}
    assert endpoint(env["REDIS_URL"]) == ("redis", 6379)
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert float(env["OTEL_TRACES_SAMPLER_ARG"]) == 1.0


def test_no_secret_is_written_in_compose() -> None:
    for name in services():
        for key, value in environment(name).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (
                    f"{name}: {key} must come from the environment (${{VAR:?…}}), not the file"
                )
    database_url = environment(SERVICE)["DATABASE_URL"]
    assert re.search(r":\$\{POSTGRES_PASSWORD:\?[^}]+\}@", database_url), database_url


def test_service_exports_to_the_collector() -> None:
    host, port = endpoint(expand(environment(SERVICE)["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    assert host == service_running("otel/opentelemetry-collector-contrib")
    http_receiver = collector()["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint(http_receiver)[1] == port == 4318
    assert port in listening_ports(host)


def test_published_ports_are_the_documented_ones_on_loopback() -> None:
    for name, port in PUBLISHED.items():
        published = [str(p) for p in services()[name].get("ports", [])]
        assert f"127.0.0.1:{port}:{port}" in published, f"{name}: {published}"
    for name, service in services().items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} publicly"


def test_prometheus_gets_the_project_config_and_rules() -> None:
    prometheus = services()["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if config_path.startswith(target + "/"):
            local = COMPOSE_FILE.parent / source / config_path[len(target) + 1 :]
            assert local.resolve() == PROMETHEUS_CONFIG.resolve()
            break
    else:
        pytest.fail(f"{config_path} is not in a mounted directory")


def test_prometheus_stores_exemplars() -> None:
    """The service's /metrics carries exemplars (trace ids) in OpenMetrics, which Prometheus
    asks for by default; it keeps them only with exemplar storage on."""
    assert "--enable-feature=exemplar-storage" in services()["prometheus"]["command"]


def test_prometheus_scrapes_services_of_the_stack() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = scrape_targets(config)
    assert targets[SERVICE] == [(SERVICE, 8000)]
    assert 8000 in listening_ports(SERVICE)
    for job, addresses in targets.items():
        for host, port in addresses:
            if host == "localhost":
                continue  # Prometheus itself
            assert host in services(), f"job {job} scrapes unknown host {host}"
            assert port in listening_ports(host), f"job {job}: {host} does not expose {port}"
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    (address,) = alertmanagers["static_configs"][0]["targets"]
    host, port = endpoint(address)
    assert services()[host]["image"].startswith("prom/alertmanager:")
    assert port in listening_ports(host)


def test_alertmanager_config_is_mounted_and_its_webhooks_resolve() -> None:
    alertmanager = services()["alertmanager"]
    sources = {
        (COMPOSE_FILE.parent / v.split(":")[0]).resolve()
        for v in alertmanager["volumes"]
        if v.startswith(".")
    }
    assert ALERTMANAGER_CONFIG.resolve() in sources
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            host, port = endpoint(webhook["url"])
            assert host in services(), webhook["url"]
            assert port in listening_ports(host), webhook["url"]


def test_the_memory_limit_is_set_for_the_memory_alert() -> None:
    limits = services()[SERVICE]["deploy"]["resources"]["limits"]
    assert limits["memory"]


# -- the collector ----------------------------------------------------------------------------


def pipelines() -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = collector()["service"]["pipelines"]
    return found


def test_collector_config_is_mounted_where_its_command_reads_it() -> None:
    service = services()["otel-collector"]
    (config_arg,) = [arg for arg in service["command"] if arg.startswith("--config")]
    path = config_arg.split("=", 1)[1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert (COMPOSE_FILE.parent / mounted[path]).resolve() == COLLECTOR_CONFIG.resolve()


def test_collector_receives_otlp_grpc_and_http() -> None:
    protocols = collector()["receivers"]["otlp"]["protocols"]
    assert endpoint(protocols["grpc"]["endpoint"]) == ("0.0.0.0", 4317)
    assert endpoint(protocols["http"]["endpoint"]) == ("0.0.0.0", 4318)


def test_collector_components_are_defined_and_used() -> None:
    config = collector()
    connectors = set(config.get("connectors", {}))
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in pipelines().items():
        assert name.split("/")[0] in {"traces", "metrics", "logs"}
        for kind in used:
            for component in pipeline.get(kind, []):
                used[kind].add(component)
                known = set(config.get(kind, {}))
                if kind != "processors":
                    known |= connectors
                assert component in known, f"pipeline {name}: {component} is not defined"
    for kind, names in used.items():
        assert set(config.get(kind, {})) <= names, f"unused {kind}: {set(config[kind]) - names}"
    assert connectors <= used["exporters"] & used["receivers"]
    assert set(config["service"]["extensions"]) == set(config.get("extensions", {}))


def test_collector_pipelines_limit_memory_first_and_batch() -> None:
    for name, pipeline in pipelines().items():
        assert pipeline["processors"][0] == "memory_limiter", name
        if set(pipeline["exporters"]) - set(collector().get("connectors", {})):
            assert "batch" in pipeline["processors"], f"{name} exports without batching"


def test_collector_sends_traces_to_jaeger_and_spanmetrics() -> None:
    traces = {name: p for name, p in pipelines().items() if name.split("/")[0] == "traces"}
    exporters = {e for p in traces.values() for e in p["exporters"]}
    assert "spanmetrics" in exporters
    jaeger_exporters = [e for e in exporters if e.split("/")[0] in {"otlp", "otlp_grpc"}]
    assert jaeger_exporters
    for exporter in jaeger_exporters:
        host, port = endpoint(collector()["exporters"][exporter]["endpoint"])
        assert services()[host]["image"].startswith("jaegertracing/jaeger:2.")
        assert port in listening_ports(host)
    for pipeline in traces.values():
        if "spanmetrics" in pipeline["exporters"]:
            assert "tail_sampling" not in pipeline["processors"], "span metrics must see every span"
        else:
            assert "tail_sampling" in pipeline["processors"], "traces to Jaeger are tail-sampled"


def test_collector_metrics_reach_prometheus() -> None:
    metrics = pipelines()["metrics"]
    assert {"otlp", "spanmetrics"} <= set(metrics["receivers"])
    assert "prometheus" in metrics["exporters"]
    _, port = endpoint(collector()["exporters"]["prometheus"]["endpoint"])
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    scraped = {address for found in scrape_targets(config).values() for address in found}
    assert ("otel-collector", port) in scraped
    assert port in listening_ports("otel-collector")


def test_tail_sampling_keeps_slow_and_error_traces() -> None:
    policies = {p["type"]: p for p in collector()["processors"]["tail_sampling"]["policies"]}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["latency"]["latency"]["threshold_ms"] == 500
    assert "upper_threshold_ms" not in policies["latency"]["latency"]
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100
    assert "OTEL_TRACES_SAMPLER" in COLLECTOR_CONFIG.read_text()  # the interaction, explained


# -- Jaeger and its Monitor tab (SPM) ----------------------------------------------------------


def jaeger() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(JAEGER_CONFIG.read_text())
    return document


def test_the_database_loads_pg_stat_statements() -> None:
    """/performance/stats lists the top statements from it (migration 0006 creates the view)."""
    command = services()["postgres"]["command"]
    settings = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    assert "shared_preload_libraries=pg_stat_statements" in settings


def test_jaeger_config_is_mounted_where_its_command_reads_it() -> None:
    service = services()["jaeger"]
    (config_arg,) = [arg for arg in service["command"] if arg.startswith("--config")]
    path = config_arg.split("=", 1)[1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert (COMPOSE_FILE.parent / mounted[path]).resolve() == JAEGER_CONFIG.resolve()


def test_jaeger_receives_what_the_collector_sends_and_answers_its_checks() -> None:
    config = jaeger()
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) == set(config[kind]), f"jaeger: unused or undefined {kind}"
    assert set(config["service"]["extensions"]) == set(config["extensions"])
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert endpoint(grpc) == ("0.0.0.0", 4317)
    assert 4317 in listening_ports("jaeger")
    query = config["extensions"]["jaeger_query"]
    assert endpoint(query["http"]["endpoint"]) == ("0.0.0.0", 16686)
    health = config["extensions"]["healthcheckv2"]["http"]["endpoint"]
    assert str(endpoint(health)[1]) in " ".join(services()["jaeger"]["healthcheck"]["test"])
    storage = config["extensions"]["jaeger_storage"]
    assert query["storage"]["traces"] in storage["backends"]
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] in storage["backends"]


def test_jaeger_monitor_tab_reads_the_collectors_span_metrics_from_prometheus() -> None:
    """SPM: Jaeger queries Prometheus for the names and labels the spanmetrics connector
    exports and Prometheus scrapes; a mismatch leaves the Monitor tab empty, silently."""
    config = jaeger()
    query = config["extensions"]["jaeger_query"]
    backends = config["extensions"]["jaeger_storage"]["metric_backends"]
    assert query["storage"].get("metrics") in backends, "the Monitor tab has no metric storage"
    spm = backends[query["storage"]["metrics"]]["prometheus"]
    host, port = endpoint(spm["endpoint"])
    assert services()[host]["image"].startswith("prom/prometheus:")
    assert port in listening_ports(host)

    connector = collector()["connectors"]["spanmetrics"]
    exported_namespace = connector["namespace"].replace(".", "_")
    assert spm["metric_namespace"] == exported_namespace
    assert spm["normalize_calls"] is True  # counters are exported with _total
    assert spm["normalize_duration"] is True  # and histograms with their unit
    assert spm["latency_unit"] == connector["histogram"]["unit"] == "s"
    # The connector's default dimensions (service.name, span.name, span.kind, status.code)
    # are the labels SPM groups and filters by: none of them is switched off.
    assert not connector.get("exclude_dimensions")
    # Prometheus scrapes the collector's exporter, where these series are.
    assert "spanmetrics" in pipelines()["metrics"]["receivers"]
    assert "prometheus" in pipelines()["metrics"]["exporters"]


# -- the image ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*"
            if part == "**"
            else "[^/]*"
            if part == "*"
            else "[^/]"
            if part == "?"
            else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_image_base_and_start_command() -> None:
    instructions = dockerfile_instructions()
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases
    assert all(re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", b) for b in bases)
    (command,) = [rest for keyword, rest in instructions if keyword == "CMD"]
    script = shlex.split(" ".join(json.loads(command)[2:]))
    text = " ".join(script)
    assert text.index("salon-reports migrate") < text.index("salon-reports serve")
    assert re.search(r'if \[ "?\$SEED_DEMO"? = 1 \]; then salon-reports seed --if-empty', text)
    serve = text[text.index("salon-reports serve") :]
    assert "--host 0.0.0.0" in serve
    assert "--workers 2" in serve
    assert "--port 8000" in serve
    assert any(keyword == "USER" for keyword, _ in instructions), "the service runs as root"


def test_image_installs_the_project_with_pip() -> None:
    runs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip (wheel|install)\b.*\.", runs)


def test_build_context_has_what_the_image_copies_and_no_secrets() -> None:
    copies = [
        rest.split()[:-1]
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and "--from" not in rest
    ]
    sources = [source for sources in copies for source in sources]
    assert {"pyproject.toml", "service", "telemetry", "migrations"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies a missing {source}"
        assert not dockerignored(source), f".dockerignore leaves out {source}, which is copied"
    for secret in (".env", ".local/postgres/pg_hba.conf", ".venv/bin/python", ".git/config"):
        assert dockerignored(secret), f"{secret} would be sent to the Docker daemon"
    assert dockerignored("service/__pycache__/x.pyc")
    assert not dockerignored("service/cli.py")


def test_compose_builds_this_dockerfile() -> None:
    build = services()[SERVICE]["build"]
    assert (
        COMPOSE_FILE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
    ).resolve() == (DOCKERFILE.resolve())


def test_no_stray_files_under_ops_dirs() -> None:
    """Every YAML in the ops files parses (a typo in an unused file still breaks a deploy)."""
    for path in [
        COMPOSE_FILE,
        COLLECTOR_CONFIG,
        JAEGER_CONFIG,
        *Path(ROOT / "alerts").rglob("*.yml"),
        *Path(ROOT / "dashboards").rglob("*.yml"),
    ]:
        assert yaml.safe_load(path.read_text()) is not None, path
