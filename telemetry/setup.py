"""OpenTelemetry set-up from the standard ``OTEL_*`` variables.

``configure()`` builds the tracer and meter providers (or takes the ones a test hands in),
the instruments, the Prometheus registry behind ``/metrics`` and the stats aggregator:

- resource: ``service.name`` (``OTEL_SERVICE_NAME``, default ``salon-reports``),
  ``service.version``, ``service.instance.id`` (one per process) and
  ``deployment.environment.name``, plus ``OTEL_RESOURCE_ATTRIBUTES``;
- traces: the sampler from ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (the SDK reads
  them), exported over OTLP/HTTP in batches when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
  traces-specific variable) is set;
- metrics: always readable at ``/metrics`` (with exemplars on the latency histograms'
  buckets, ``telemetry/exemplars.py``); also exported over OTLP when an endpoint is set;
- ``OTEL_SEMCONV_STABILITY_OPT_IN`` defaults to ``database,http``: the SQL and Redis spans
  carry the stable database conventions, as the metrics do;
- ``OTEL_SDK_DISABLED=true`` turns spans and metrics into no-ops; the stats aggregator keeps
  counting, as it does whatever the sampler decides.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from telemetry.exemplars import ExemplarPrometheusReader
from telemetry.metrics import Instruments
from telemetry.stats import StatsAggregator, Thresholds
from telemetry.stats.slo import SloCounter

SCOPE = "salon-reports"
DEFAULT_SERVICE_NAME = "salon-reports"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def sdk_disabled(env: Mapping[str, str]) -> bool:
    return _truthy(env.get("OTEL_SDK_DISABLED"))


def _has_endpoint(env: Mapping[str, str], signal: str) -> bool:
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def build_resource(version: str, environment: str, instance_id: str) -> Resource:
    attributes = {
        "service.version": version,
        "service.instance.id": instance_id,
        "deployment.environment.name": environment,
    }
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    return Resource.create(attributes)


@dataclass
class Telemetry:
    """What the app holds for its lifetime; ``shutdown()`` flushes the exporters."""

    tracer_provider: trace.TracerProvider
    meter_provider: MeterProvider
    registry: CollectorRegistry
    instruments: Instruments
    stats: StatsAggregator
    instance_id: str
    # Report requests by minute, for the error budgets (telemetry/stats/slo.py).
    slo: SloCounter = field(default_factory=SloCounter)
    enabled: bool = True
    _owned: list[object] = field(default_factory=list)

    @property
    def tracer(self) -> trace.Tracer:
        return self.tracer_provider.get_tracer(SCOPE)

    def shutdown(self) -> None:
        for provider in self._owned:
            provider.shutdown()  # type: ignore[attr-defined]


def configure(
    *,
    version: str,
    environment: str,
    slow_query_ms: float,
    tracer_provider: trace.TracerProvider | None = None,
    metric_readers: list[MetricReader] | None = None,
    env: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build providers from the environment; tests pass in-memory ones instead."""
    env = os.environ if env is None else env
    instance_id = str(uuid.uuid4())
    resource = build_resource(version, environment, instance_id)
    disabled = sdk_disabled(env)
    owned: list[object] = []

    if tracer_provider is None:
        sdk_tracer_provider = TracerProvider(resource=resource)
        if not disabled and _has_endpoint(env, "TRACES"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            sdk_tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        tracer_provider = sdk_tracer_provider
        owned.append(sdk_tracer_provider)

    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = [ExemplarPrometheusReader(registry=registry)]
    if not disabled and _has_endpoint(env, "METRICS"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    readers.extend(metric_readers or [])
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    owned.append(meter_provider)

    instruments = Instruments(meter_provider.get_meter(SCOPE))
    stats = StatsAggregator(
        slow_query_ms=slow_query_ms,
        thresholds=Thresholds(query_p95_ms=slow_query_ms),
        worker_id=instance_id,
    )
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        registry=registry,
        instruments=instruments,
        stats=stats,
        instance_id=instance_id,
        enabled=not disabled,
        _owned=owned,
    )
