"""The two-layer collector tier (``docker compose --profile collector-tier``), structurally.

Layer 1 (``otel-gateway``) receives the service's OTLP and forwards each span twice with the
loadbalancing exporter: by trace id to the tail-sampling receiver of layer 2 (``otel-sampler``;
the tail sampler must see every span of a trace), and by service to its span-metrics receiver
(one collector computes a service's span metrics). As for the rest of the stack, no container
runs here: these check that the pieces fit.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.ops.test_compose import (
    NO_HEALTHCHECK,
    SERVICE,
    endpoint,
    environment,
    expand,
    listening_ports,
    scrape_targets,
    services,
)
from tests.ops.tools import COLLECTOR_CONFIG, COMPOSE_FILE, PROMETHEUS_CONFIG

PROFILE = "collector-tier"
GATEWAY = "otel-gateway"
SAMPLER = "otel-sampler"


def config_of(name: str) -> dict[str, Any]:
    """The collector config a compose service runs with (the file mounted where its
    ``--config`` points)."""
    service = services()[name]
    (argument,) = [arg for arg in service["command"] if arg.startswith("--config=")]
    path = argument.split("=", 1)[1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    document: dict[str, Any] = yaml.safe_load((COMPOSE_FILE.parent / mounted[path]).read_text())
    return document


def pipelines(config: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = config["service"]["pipelines"]
    return found


def grpc_port(receiver: dict[str, Any]) -> int:
    return endpoint(receiver["protocols"]["grpc"]["endpoint"])[1]


def receivers_on(config: dict[str, Any], port: int) -> list[str]:
    return [name for name, r in config["receivers"].items() if grpc_port(r) == port]


def test_the_tier_is_a_profile_of_pinned_collectors() -> None:
    single = services()["otel-collector"]["image"]
    for name in (GATEWAY, SAMPLER):
        service = services()[name]
        assert service["profiles"] == [PROFILE]
        assert service["image"] == single  # the same pinned contrib image
        assert name in NO_HEALTHCHECK
    assert services()[SAMPLER]["deploy"]["replicas"] >= 2  # a tier, not one box
    assert services()[GATEWAY]["deploy"]["replicas"] >= 2
    assert "otel-sampler" in services()[GATEWAY]["depends_on"]


def test_the_service_exports_to_the_gateway_with_the_profile() -> None:
    value = environment(SERVICE)["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint(expand(value))[0] == "otel-collector"  # the default stack
    host, port = endpoint(expand(value, {"OTEL_COLLECTOR_HOST": GATEWAY}))
    assert host == GATEWAY
    http = config_of(GATEWAY)["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint(http)[1] == port
    assert port in listening_ports(GATEWAY)
    assert f"OTEL_COLLECTOR_HOST={GATEWAY}" in COMPOSE_FILE.read_text()  # how to start it


@pytest.mark.parametrize("name", [GATEWAY, SAMPLER])
def test_components_are_defined_used_and_memory_limited_first(name: str) -> None:
    config = config_of(name)
    connectors = set(config.get("connectors", {}))
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline_name, pipeline in pipelines(config).items():
        assert pipeline_name.split("/")[0] in {"traces", "metrics", "logs"}
        assert pipeline["processors"][0] == "memory_limiter", pipeline_name
        if set(pipeline["exporters"]) - connectors:
            assert "batch" in pipeline["processors"], f"{pipeline_name} exports unbatched"
        for kind in used:
            for component in pipeline.get(kind, []):
                used[kind].add(component)
                known = set(config.get(kind, {})) | (connectors if kind != "processors" else set())
                assert component in known, f"{name} {pipeline_name}: {component} undefined"
    for kind, names in used.items():
        assert set(config.get(kind, {})) <= names, f"{name}: unused {kind}"
    assert connectors <= used["exporters"] & used["receivers"]
    assert set(config["service"]["extensions"]) == set(config.get("extensions", {}))
    for receiver in config["receivers"].values():
        for protocol in receiver["protocols"].values():
            assert endpoint(protocol["endpoint"])[1] in listening_ports(name)


def test_gateways_route_by_trace_id_to_tail_sampling_and_by_service_to_span_metrics() -> None:
    gateway, sampler = config_of(GATEWAY), config_of(SAMPLER)
    routes: dict[str, int] = {}  # routing key -> sampler port
    for exporter in gateway["exporters"].values():
        dns = exporter["resolver"]["dns"]
        assert dns["hostname"] == SAMPLER  # every replica, by DNS
        assert dns["port"] in listening_ports(SAMPLER)
        routes[exporter["routing_key"]] = dns["port"]
    assert set(routes) == {"traceID", "service"}
    assert routes["traceID"] != routes["service"]

    traces = {n: p for n, p in pipelines(gateway).items() if n.startswith("traces")}
    sent = [gateway["exporters"][e]["routing_key"] for p in traces.values() for e in p["exporters"]]
    assert sorted(sent) == ["service", "traceID"]  # every span goes both ways, once each
    for pipeline in traces.values():
        assert "tail_sampling" not in pipeline["processors"]  # the gateways keep no trace state
    (metrics,) = [p for n, p in pipelines(gateway).items() if n.startswith("metrics")]
    assert [gateway["exporters"][e]["routing_key"] for e in metrics["exporters"]] == ["service"]

    # On the samplers: what arrives by trace id is tail-sampled and goes to Jaeger; what
    # arrives by service feeds the span metrics and Prometheus, never the sampler.
    (by_trace,) = receivers_on(sampler, routes["traceID"])
    (by_service,) = receivers_on(sampler, routes["service"])
    for name, pipeline in pipelines(sampler).items():
        if by_trace in pipeline["receivers"]:
            assert name.startswith("traces")
            assert "tail_sampling" in pipeline["processors"]
            (jaeger,) = pipeline["exporters"]
            host, port = endpoint(sampler["exporters"][jaeger]["endpoint"])
            assert services()[host]["image"].startswith("jaegertracing/jaeger:2.")
            assert port in listening_ports(host)
        if by_service in pipeline["receivers"] and name.startswith("traces"):
            assert pipeline["exporters"] == ["spanmetrics"]
            assert "tail_sampling" not in pipeline["processors"]
    (sampler_metrics,) = [p for n, p in pipelines(sampler).items() if n.startswith("metrics")]
    assert {by_service, "spanmetrics"} <= set(sampler_metrics["receivers"])
    assert "prometheus" in sampler_metrics["exporters"]


def test_the_samplers_decide_like_the_single_collector() -> None:
    single = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    sampler = config_of(SAMPLER)
    assert sampler["processors"]["tail_sampling"] == single["processors"]["tail_sampling"]
    assert sampler["connectors"]["spanmetrics"] == single["connectors"]["spanmetrics"]


def test_prometheus_finds_every_sampler() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = scrape_targets(config)
    port = endpoint(config_of(SAMPLER)["exporters"]["prometheus"]["endpoint"])[1]
    assert (SAMPLER, port) in targets[SAMPLER]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == SAMPLER]
    assert job["dns_sd_configs"]  # all replicas, not one name
    assert port in listening_ports(SAMPLER)
