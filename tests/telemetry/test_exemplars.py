"""Exemplars on /metrics (telemetry/exemplars.py): a latency bucket names a trace that exists.

- the reader keeps the SDK's exemplars per bucket across collections (the publisher collects
  every 2 s; a scrape in between must still see them) and puts them where the value falls;
- a sampled request leaves its server span on ``http_server_request_duration_seconds`` and
  its statement's span on ``db_client_operation_duration_seconds``, in OpenMetrics only;
- an unsampled request leaves none, not even the trace id of a sampled span around it;
- another worker's exemplars survive the merge through its Redis publication;
- the text-format answer (no ``Accept: application/openmetrics-text``) is, byte for byte, what
  merging the workers' text expositions gave before the workers published OpenMetrics;
- the OpenMetrics answer, merged on the text, says what ``Combined``'s parse-and-render would,
  label values with braces, quotes, ``#`` and line separators included.
"""

from __future__ import annotations

from collections.abc import Iterator

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_families
from prometheus_client.samples import Sample

from service.config import Settings
from service.workers import WORKER_LABEL, Combined, exposition, merge_openmetrics
from telemetry.exemplars import ExemplarPrometheusReader, exemplar_context
from telemetry.metrics import DURATION_BUCKETS_SECONDS
from tests.conftest import Api, RunningApi, app_settings
from tests.reports.test_hits import hits_of

PREFIX = "/api/v1/optimized-reports"
OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}
REQUESTS = "http_server_request_duration_seconds"
STATEMENTS = "db_client_operation_duration_seconds"


def exemplars(text: str, family_name: str) -> list[Sample]:
    """The bucket samples of ``family_name`` that carry an exemplar."""
    return [
        sample
        for family in text_string_to_metric_families(text)
        if family.name == family_name
        for sample in family.samples
        if sample.exemplar is not None
    ]


def all_exemplars(text: str) -> list[Sample]:
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.exemplar is not None
    ]


def hex_ids(span: ReadableSpan) -> dict[str, str]:
    return {
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
    }


def assert_in_its_bucket(sample: Sample) -> None:
    assert sample.exemplar is not None
    le = sample.labels["le"]
    value = sample.exemplar.value
    bounds = [*DURATION_BUCKETS_SECONDS, float("inf")]
    upper = float(le)
    assert value <= upper, sample
    lower = max((bound for bound in bounds if bound < upper), default=0.0)
    assert value > lower, sample


async def openmetrics(api: Api) -> str:
    response = await api.get("/metrics", headers=OPENMETRICS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    return response.text


# -- the reader -------------------------------------------------------------------------------


def test_the_newest_sampled_measurement_of_each_bucket_is_kept_across_collections() -> None:
    registry = CollectorRegistry(auto_describe=True)
    reader = ExemplarPrometheusReader(registry=registry)
    meters = MeterProvider(metric_readers=[reader])
    histogram = meters.get_meter("test").create_histogram(
        "http.server.request.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
    )
    tracer = TracerProvider().get_tracer("test")
    labels = {"http.route": "/x", "http.response.status_code": 200}
    spans = []
    for value in (0.02, 0.025, 0.3):  # 0.025 is on a boundary: the le="0.025" bucket
        with tracer.start_as_current_span("request") as span:
            spans.append(span)
            histogram.record(value, labels, context=exemplar_context(span))
    try:
        first = openmetrics_latest(registry).decode()
        # The publisher collected in between: the SDK's reservoir is empty now, the store not.
        second = openmetrics_latest(registry).decode()
    finally:
        meters.shutdown()
    for text in (first, second):
        found = {sample.labels["le"]: sample.exemplar for sample in exemplars(text, REQUESTS)}
        assert set(found) == {"0.025", "0.5"}, text
        newest, slow = found["0.025"], found["0.5"]
        assert newest is not None
        assert slow is not None
        assert newest.labels == {
            "trace_id": format(spans[1].get_span_context().trace_id, "032x"),
            "span_id": format(spans[1].get_span_context().span_id, "016x"),
        }
        assert newest.value == 0.025
        assert slow.labels["span_id"] == format(spans[2].get_span_context().span_id, "016x")
        assert slow.value == 0.3
        assert slow.timestamp is not None
        for sample in exemplars(text, REQUESTS):
            assert sample.labels["http_route"] == "/x"
            assert_in_its_bucket(sample)


def test_an_unsampled_span_and_no_span_make_no_exemplar() -> None:
    registry = CollectorRegistry(auto_describe=True)
    reader = ExemplarPrometheusReader(registry=registry)
    meters = MeterProvider(metric_readers=[reader])
    histogram = meters.get_meter("test").create_histogram(
        "db.client.operation.duration",
        unit="s",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
    )
    sampled = TracerProvider().get_tracer("test")
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    try:
        # A sampled span is current, but the measurement belongs to an unsampled one (or to
        # none): it must not borrow the current span's trace.
        with sampled.start_as_current_span("around"):
            with unsampled.start_as_current_span("statement") as span:
                histogram.record(0.01, {"db.query.summary": "q"}, context=exemplar_context(span))
            histogram.record(0.01, {"db.query.summary": "q"}, context=exemplar_context(None))
        text = openmetrics_latest(registry).decode()
    finally:
        meters.shutdown()
    assert f'{STATEMENTS}_count{{db_query_summary="q"' in text
    assert all_exemplars(text) == []


# -- the service ------------------------------------------------------------------------------


async def test_a_sampled_request_is_the_exemplar_of_its_buckets(
    api: Api, data: dict[str, int]
) -> None:
    response = await api.report("dashboard", salon_id=data["lisbon"])
    assert response.headers["x-cache"] == "MISS"
    spans = api.spans.get_finished_spans()
    trace_id = response.headers["x-trace-id"]
    [server] = [
        s
        for s in spans
        if s.kind is SpanKind.SERVER and format(s.context.trace_id, "032x") == trace_id
    ]
    [statement] = [
        s
        for s in spans
        if s.name == "report.dashboard" and format(s.context.trace_id, "032x") == trace_id
    ]

    text = await openmetrics(api)
    route = f"{PREFIX}/dashboard"
    [request_bucket] = [s for s in exemplars(text, REQUESTS) if s.labels["http_route"] == route]
    assert request_bucket.exemplar is not None
    assert request_bucket.exemplar.labels == hex_ids(server)  # trace and span ids, nothing else
    assert_in_its_bucket(request_bucket)
    [statement_bucket] = [
        s for s in exemplars(text, STATEMENTS) if s.labels["db_query_summary"] == "report.dashboard"
    ]
    assert statement_bucket.exemplar is not None
    assert statement_bucket.exemplar.labels == hex_ids(statement)
    assert_in_its_bucket(statement_bucket)
    assert statement_bucket.labels["worker"] == api.resources.telemetry.instance_id

    # Every exemplar on the page names a trace that was exported.
    exported = {format(s.context.trace_id, "032x") for s in api.spans.get_finished_spans()}
    for sample in all_exemplars(text):
        assert sample.exemplar is not None
        assert sample.exemplar.labels["trace_id"] in exported, sample

    # A hit answered by the hit path (before FastAPI) is measured by the same middleware.
    hits = hits_of(api)
    answered = hits.answered
    hit = await api.report("dashboard", salon_id=data["lisbon"])
    assert hit.headers["x-cache"] == "HIT"
    assert hits.answered == answered + 1
    hit_traces = {
        sample.exemplar.labels["trace_id"]
        for sample in exemplars(await openmetrics(api), REQUESTS)
        if sample.labels["http_route"] == route and sample.exemplar is not None
    }
    assert hit.headers["x-trace-id"] in hit_traces

    # Text format 0.0.4, as before: no exemplars, same content type.
    plain = await api.get("/metrics")
    assert plain.headers["content-type"] == CONTENT_TYPE_LATEST
    assert trace_id not in plain.text
    assert "# {" not in plain.text


async def test_an_unsampled_request_leaves_no_exemplar(api: Api, data: dict[str, int]) -> None:
    """The request arrives with an unsampled ``traceparent`` (flags 00), while a sampled span
    of another tracer is current around the app (as an in-process caller's would be): neither
    trace id may reach a bucket."""
    around = TracerProvider().get_tracer("caller")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    with around.start_as_current_span("caller") as caller:
        response = await api.get(
            f"{PREFIX}/dashboard",
            api.token(),
            params={"salon_id": data["lisbon"]},
            headers={"traceparent": parent},
        )
    assert response.status_code == 200
    assert response.headers["x-cache"] == "MISS"  # a statement ran, unsampled
    trace_id = response.headers["x-trace-id"]
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    caller_trace = format(caller.get_span_context().trace_id, "032x")

    text = await openmetrics(api)
    route = f"{PREFIX}/dashboard"
    counted = f'{REQUESTS}_count{{http_request_method="GET",http_response_status_code="200"'
    assert f'{counted},http_route="{route}"' in text  # the request was measured
    assert 'db_query_summary="report.dashboard"' in text
    traces = {
        sample.exemplar.labels["trace_id"]
        for sample in all_exemplars(text)
        if sample.exemplar is not None
    }
    assert trace_id not in traces
    assert caller_trace not in traces
    assert not [s for s in exemplars(text, REQUESTS) if s.labels["http_route"] == route]
    assert not [
        s for s in exemplars(text, STATEMENTS) if s.labels["db_query_summary"] == "report.dashboard"
    ]


async def test_both_workers_exemplars_survive_the_merge(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        traces: dict[str, str] = {}
        for api, salon in ((one, "lisbon"), (two, "newyork")):
            response = await api.report("dashboard", salon_id=data[salon])
            assert response.status_code == 200
            traces[api.resources.telemetry.instance_id] = response.headers["x-trace-id"]
        for api in (one, two):
            publisher = api.resources.publisher
            assert publisher is not None
            await publisher.publish()
        answers = [await openmetrics(one), await openmetrics(two)]
    route = f"{PREFIX}/dashboard"
    for text in answers:
        by_worker: dict[str, set[str]] = {}
        for sample in exemplars(text, REQUESTS):
            if sample.labels["http_route"] == route and sample.exemplar is not None:
                by_worker.setdefault(sample.labels["worker"], set()).add(
                    sample.exemplar.labels["trace_id"]
                )
        assert by_worker == {worker: {trace_id} for worker, trace_id in traces.items()}, text
        statement_traces = {
            sample.labels["worker"]: sample.exemplar.labels["trace_id"]
            for sample in exemplars(text, STATEMENTS)
            if sample.labels["db_query_summary"] == "report.dashboard"
            and sample.exemplar is not None
        }
        assert statement_traces == traces


class _Collected:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class _TextMerge:
    """The merge as it was before exemplars: text format 0.0.4 parsed and relabelled."""

    def __init__(self, expositions: list[tuple[str, str]]) -> None:
        self.expositions = expositions

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in self.expositions:
            for family in text_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    labels = {**sample.labels, WORKER_LABEL: worker}
                    merged.samples.append(sample._replace(labels=labels))
        yield from families.values()


async def test_the_text_answer_is_the_merge_of_text_expositions_byte_for_byte(
    api: Api, data: dict[str, int]
) -> None:
    for report in ("dashboard", "bookings", "professionals", "realtime"):
        for salon in ("lisbon", "newyork"):
            await api.report(report, salon_id=data[salon])
    await api.report("dashboard", "not-a-token", salon_id=data["lisbon"])  # a 401 series
    # One collection, rendered both ways (a second collection would differ: memory, time).
    collected = _Collected(list(api.resources.telemetry.registry.collect()))
    text = generate_latest(collected).decode()  # type: ignore[arg-type]
    openmetrics = openmetrics_latest(collected).decode()
    assert " # {" in openmetrics  # exemplars in the OpenMetrics one
    workers = ("one", "two")

    before = CollectorRegistry(auto_describe=False)
    before.register(_TextMerge([(worker, text) for worker in workers]))
    now = CollectorRegistry(auto_describe=False)
    now.register(Combined([(worker, openmetrics) for worker in workers]))
    expected = generate_latest(before).decode()
    assert 'worker="two"' in expected
    assert generate_latest(now).decode() == expected


def _tricky_exposition() -> str:
    """Label values that a naive scan of a sample line would get wrong."""
    from prometheus_client import Counter, Gauge, Histogram

    registry = CollectorRegistry(auto_describe=False)
    counter = Counter(
        "tricky", 'Label values with {braces} and "quotes".', ["route"], registry=registry
    )
    for value in ("/a/{id}", 'x"}y # z', "back\\slash", "line\nbreak", "u\u2028v", ""):
        counter.labels(value).inc()
    Gauge("bare", "No labels at all.", registry=registry).set(2)
    histogram = Histogram(
        "slow_seconds", "With an exemplar.", ["route"], buckets=(0.1, 1), registry=registry
    )
    histogram.labels("/b/{x}").observe(0.5, exemplar={"trace_id": "ab" * 16, "span_id": "cd" * 8})
    text: bytes = openmetrics_latest(registry)
    return text.decode()


def _described(families: Iterator[Metric] | list[Metric]) -> list[tuple[object, ...]]:
    return [
        (
            family.name,
            family.type,
            family.unit,
            family.documentation,
            sorted(
                (sample.name, sorted(sample.labels.items()), sample.value, sample.exemplar)
                for sample in family.samples
            ),
        )
        for family in families
    ]


async def test_the_openmetrics_merge_says_what_parsing_and_rendering_would(
    api: Api, data: dict[str, int]
) -> None:
    await api.report("dashboard", salon_id=data["lisbon"])  # exemplars on both histograms
    own = exposition(api.resources.telemetry)
    assert " # {" in own
    expositions = [("one", own), ("two", own), ('three "3"', _tricky_exposition())]
    merged = merge_openmetrics(expositions).decode()
    parsed = list(text_string_to_metric_families(merged))  # the parser is strict: it parses
    assert _described(parsed) == _described(Combined(expositions).collect())
    assert merged.endswith("# EOF\n")
    assert merged.count(f"# TYPE {REQUESTS} histogram") == 1
    tricky = [family for family in parsed if family.name == "tricky"]
    assert {sample.labels["route"] for sample in tricky[0].samples} >= {"/a/{id}", 'x"}y # z'}


def test_a_label_set_that_does_not_close_is_dropped_not_backtracked_through() -> None:
    # With a backtracking pattern this line alone takes longer than the test's timeout.
    broken = 'up{instance="' + "a" * 200 + " 1"
    text = f"# HELP up Up.\n# TYPE up gauge\n{broken}\nup 1\n# EOF\n"
    merged = merge_openmetrics([("one", text)]).decode()
    assert merged == '# HELP up Up.\n# TYPE up gauge\nup{worker="one"} 1\n# EOF\n'
