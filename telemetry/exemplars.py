"""Exemplars on the latency histograms: from a bucket of ``/metrics`` to the trace behind it.

The OpenTelemetry SDK already makes exemplars: its default ``trace_based`` exemplar filter
offers a measurement only when the context it is recorded in holds a *sampled* span, and the
aligned-histogram reservoir keeps the last one per bucket (trace id, span id, value, time).
``opentelemetry-exporter-prometheus`` (0.66b2) drops them on the way to prometheus_client
(upstream's pull request for it is not merged), so ``ExemplarPrometheusReader`` is that
exporter plus the missing step:

- at each collection it takes the exemplars of ``http.server.request.duration`` and
  ``db.client.operation.duration`` from the SDK's data points and remembers the newest per
  (series, bucket) (the SDK's reservoir forgets them at every collection, and ``/metrics``
  and the worker publication both collect);
- it puts them on the ``_bucket`` samples of the exposition, labelled ``trace_id`` and
  ``span_id`` only (no salon, no query text: an exemplar is readable by whoever reads the
  metrics), with the measurement's value and time. The OpenMetrics exposition
  (``prometheus_client.openmetrics.exposition``) prints them; text format 0.0.4 cannot and
  ignores them.

Recording sites pass ``exemplar_context(span)``: the span's context when it is sampled, else
a context holding no span, so an unsampled request never lends a trace id (not even an
ambient one). The per-request cost is a flag test; a context is made for sampled spans only.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.exporter.prometheus._mapping import sanitize_attribute
from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

# OpenTelemetry name -> the Prometheus family name the exporter gives it.
EXEMPLAR_HISTOGRAMS = {
    "http.server.request.duration": "http_server_request_duration_seconds",
    "db.client.operation.duration": "db_client_operation_duration_seconds",
}
TRACE_ID = "trace_id"
SPAN_ID = "span_id"
_SCOPE_LABEL_PREFIX = "otel_scope_"  # added by the exporter, not part of a point's attributes
_INFINITY = "+Inf"

# A context whose current span is the invalid one: the trace-based filter offers nothing.
# (An empty Context would not do: the SDK reads ``context or get_current()``.)
NO_EXEMPLAR = trace.set_span_in_context(trace.INVALID_SPAN, Context())

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def exemplar_context(span: trace.Span | None) -> Context:
    """The context to record a measurement in: the span's if it is sampled, else none."""
    if span is not None and span.get_span_context().trace_flags.sampled:
        return trace.set_span_in_context(span)
    return NO_EXEMPLAR


def _label_value(value: object) -> str:
    # As the exporter writes label values (its _check_value): strings as they are, the rest
    # as JSON (200 -> "200", True -> "true").
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _bucket(value: float, bounds: Sequence[float]) -> str:
    """The ``le`` of the bucket the value falls in, spelt as the exporter spells it."""
    index = bisect_left(bounds, value)
    return f"{bounds[index]}" if index < len(bounds) else _INFINITY


class ExemplarStore:
    """The newest exemplar per (family, series labels) and bucket ``le``."""

    def __init__(self) -> None:
        self._exemplars: dict[SeriesKey, dict[str, tuple[int, Exemplar]]] = {}

    def harvest(self, metrics_data: MetricsData) -> None:
        for resource_metrics in metrics_data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    family = EXEMPLAR_HISTOGRAMS.get(metric.name)
                    if family is None:
                        continue
                    for point in metric.data.data_points:
                        if isinstance(point, HistogramDataPoint) and point.exemplars:
                            self._keep(family, point)

    def _keep(self, family: str, point: HistogramDataPoint) -> None:
        labels = frozenset(
            (sanitize_attribute(key), _label_value(value))
            for key, value in (point.attributes or {}).items()
        )
        buckets = self._exemplars.setdefault((family, labels), {})
        for exemplar in point.exemplars:
            if exemplar.trace_id is None or exemplar.span_id is None:
                continue
            le = _bucket(exemplar.value, point.explicit_bounds)
            kept = buckets.get(le)
            if kept is not None and kept[0] > exemplar.time_unix_nano:
                continue
            buckets[le] = (
                exemplar.time_unix_nano,
                Exemplar(
                    {
                        TRACE_ID: format(exemplar.trace_id, "032x"),
                        SPAN_ID: format(exemplar.span_id, "016x"),
                    },
                    exemplar.value,
                    exemplar.time_unix_nano / 1e9,
                ),
            )

    def attach(self, families: Iterable[Metric]) -> Iterator[Metric]:
        """The families, with the remembered exemplars on their ``_bucket`` samples."""
        for family in families:
            if family.name in EXEMPLAR_HISTOGRAMS.values() and self._exemplars:
                bucket_name = family.name + "_bucket"
                samples = []
                for sample in family.samples:
                    if sample.name == bucket_name and sample.exemplar is None:
                        labels = frozenset(
                            item
                            for item in sample.labels.items()
                            if item[0] != "le" and not item[0].startswith(_SCOPE_LABEL_PREFIX)
                        )
                        found = self._exemplars.get((family.name, labels), {}).get(
                            sample.labels.get("le", "")
                        )
                        if found is not None:
                            sample = sample._replace(exemplar=found[1])
                    samples.append(sample)
                family.samples = samples
            yield family


class _WithExemplars:
    """The exporter's collector as the registry sees it, exemplars added."""

    def __init__(self, source: CollectorRegistry, store: ExemplarStore) -> None:
        self.source = source
        self.store = store

    def describe(self) -> list[Metric]:
        # Known to the registry without a collection (it would collect before the reader
        # belongs to a meter provider).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.store.attach(self.source.collect())


class ExemplarPrometheusReader(PrometheusMetricReader):
    """``PrometheusMetricReader`` whose histograms keep the SDK's exemplars (see above)."""

    def __init__(self, registry: CollectorRegistry, **kwargs: Any) -> None:
        # The exporter's own collector goes into a private registry; ``registry`` gets it
        # through _WithExemplars.
        self._source = CollectorRegistry(auto_describe=False)
        super().__init__(registry=self._source, **kwargs)
        self.exemplars = ExemplarStore()
        self._outer = registry
        self._wrapper = _WithExemplars(self._source, self.exemplars)
        registry.register(self._wrapper)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if metrics_data is not None:
            self.exemplars.harvest(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._outer.unregister(self._wrapper)
        super().shutdown(timeout_millis, **kwargs)
