"""What the alert rules and the dashboards read, and the metric contract they must keep to.

- :func:`rule_expressions` and :func:`dashboard_expressions` list every PromQL expression of
  ``alerts/*.rules.yml`` and ``dashboards/*.json`` (Grafana variables substituted).
- :func:`analyse` pulls the metric names, label names and label matchers out of one
  expression. It is a small PromQL lexer, not a parser: syntax is checked by ``promtool``.
- :func:`dashboard_metric_names` is every metric name that the dashboards and the rules read,
  less the series Prometheus makes up itself (``up``): each of them must appear in the
  service's ``/metrics``.
- :func:`contract` reads the table of ``telemetry/README.md``: series and their labels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.ops.tools import DASHBOARD_FILES, ROOT, RULE_FILES

CONTRACT_FILE = ROOT / "telemetry" / "README.md"

# Series that Prometheus itself adds to every scrape: never in the service's /metrics.
PROMETHEUS_SYNTHETIC = frozenset({"up"})
# Labels that Prometheus attaches (job, instance) or that histograms carry (le).
PROMETHEUS_LABELS = frozenset({"job", "instance", "le", "__name__"})

# Grafana's built-in interval variables, replaced by a plausible value before parsing.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}

# fmt: off
AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
        "topk", "quantile",
    }
)
FUNCTIONS = frozenset(
    {
        "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
        "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
        "floor", "histogram_count", "histogram_sum", "histogram_fraction", "histogram_quantile",
        "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln",
        "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round", "scalar",
        "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
        "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
        "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time", "acos",
        "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh",
        "deg", "rad", "pi",
    }
)
# fmt: on
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?  # a number, or a duration:
                 (?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)


@dataclass
class Analysis:
    """What one PromQL expression reads."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)
    functions: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"unexpected {expr[position : position + 20]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, match.group()))
    return tokens


def _unquote(text: str) -> str:
    inner = text[1:-1]
    return inner if text.startswith("`") else re.sub(r"\\(.)", r"\1", inner)


def analyse(expr: str) -> Analysis:
    """Metric names, label names and matchers of a PromQL expression."""
    tokens = _tokens(expr)
    result = Analysis()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident":
            word = text.lower()
            if word in _GROUPING:
                i += 1
                if following == "(":
                    i += 1
                    while tokens[i][1] != ")":
                        if tokens[i][0] == "ident":
                            result.labels.add(tokens[i][1])
                        i += 1
                    i += 1
                continue
            if word in _KEYWORDS:
                i += 1
                continue
            if text in AGGREGATIONS and following.lower() in {"by", "without"}:
                result.functions.add(text)  # `sum by (x) (...)`
            elif following == "(":
                if text not in FUNCTIONS | AGGREGATIONS:
                    raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
                result.functions.add(text)
            else:
                result.metrics.add(text)
            i += 1
        elif text == "{":
            i += 1
            while tokens[i][1] != "}":
                if tokens[i][1] == ",":
                    i += 1
                    continue
                label, op, value = tokens[i][1], tokens[i + 1][1], tokens[i + 2]
                if tokens[i][0] != "ident" or value[0] != "string":
                    raise ValueError(f"cannot read the label matchers of {expr!r}")
                result.labels.add(label)
                result.matchers.append((label, op, _unquote(value[1])))
                if label == "__name__" and op == "=":
                    result.metrics.add(_unquote(value[1]))
                i += 3
            i += 1
        elif text == "[":
            while tokens[i][1] != "]":
                i += 1
            i += 1
        else:
            i += 1
    return result


def substitute_variables(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``); unknown ones raise."""
    known = GRAFANA_VARIABLES | (variables or {})

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in known:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return known[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", replace, expr)


# -- the expressions --------------------------------------------------------------------------


def rule_expressions(files: list[Path] | None = None) -> list[tuple[str, str]]:
    """(where, expr) of every alerting and recording rule."""
    found = []
    for path in files or RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                found.append((f"{path.name}: {name}", str(rule["expr"])))
    return found


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(path: Path) -> list[dict[str, Any]]:
    """Every panel of a dashboard, rows' nested panels included."""
    return list(_panels(json.loads(path.read_text())["panels"]))


def _is_prometheus(datasource: Any) -> bool:
    if datasource is None:
        return True  # the default data source, Prometheus
    if isinstance(datasource, dict):
        return datasource.get("type") == "prometheus"
    return "prom" in str(datasource).lower()


def dashboard_variables(path: Path) -> dict[str, str]:
    """Current values of a dashboard's template variables."""
    dashboard = json.loads(path.read_text())
    values = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value", variable.get("query", ""))
        values[variable["name"]] = str(current)
    return values


def dashboard_expressions(files: list[Path] | None = None) -> list[tuple[str, str]]:
    """(where, expr) of every Prometheus query of the dashboards, variables substituted."""
    found = []
    for path in files or DASHBOARD_FILES:
        variables = dashboard_variables(path)
        for panel in dashboard_panels(path):
            for target in panel.get("targets", []):
                datasource = target.get("datasource", panel.get("datasource"))
                if "expr" in target and _is_prometheus(datasource):
                    where = f"{path.name}: panel {panel['title']!r} {target.get('refId', '')}"
                    found.append((where, substitute_variables(target["expr"], variables)))
    return found


def dashboard_legend_labels(files: list[Path] | None = None) -> list[tuple[str, str]]:
    """(where, label) of every ``{{label}}`` in the dashboards' legends."""
    found = []
    for path in files or DASHBOARD_FILES:
        for panel in dashboard_panels(path):
            for target in panel.get("targets", []):
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                    found.append((f"{path.name}: panel {panel['title']!r}", label))
    return found


def recording_rules(files: list[Path] | None = None) -> dict[str, set[str]]:
    """Series recorded by the rule files -> the labels their rules set (``labels:``).

    Prometheus makes them from the service's series, so they are never in ``/metrics``: the
    metrics their expressions read are (those are checked like any other)."""
    recorded: dict[str, set[str]] = {}
    for path in files or RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    labels = recorded.setdefault(rule["record"], set())
                    labels.update(rule.get("labels", {}))
    return recorded


def recorded_labels() -> set[str]:
    """Labels that recording rules attach (``slo``): on recorded series, not in /metrics."""
    return set().union(*recording_rules().values())


def read_metric_names() -> dict[str, set[str]]:
    """Every metric name read by a rule or a dashboard -> where it is read, recorded series
    (made by the rules themselves) left out."""
    names: dict[str, set[str]] = {}
    recorded = recording_rules()
    for where, expr in rule_expressions() + dashboard_expressions():
        for name in analyse(expr).metrics - set(recorded):
            names.setdefault(name, set()).add(where)
    return names


def dashboard_metric_names() -> set[str]:
    """Every metric name that the dashboards and the alert rules read and the service must
    expose at ``/metrics`` (Prometheus' own ``up`` left out)."""
    return set(read_metric_names()) - PROMETHEUS_SYNTHETIC


# -- the contract -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """The metric table of telemetry/README.md."""

    series: dict[str, frozenset[str]]  # Prometheus series name -> its labels
    values: dict[str, frozenset[str]]  # label -> its complete set of values, where listed

    @property
    def labels(self) -> frozenset[str]:
        return frozenset().union(*self.series.values())


def _expand(series: str) -> list[str]:
    match = re.fullmatch(r"(\w+)\{([\w,]+)\}", series)
    if match is None:
        return [series]
    return [match.group(1) + suffix for suffix in match.group(2).split(",")]


@cache
def contract(path: Path = CONTRACT_FILE) -> Contract:
    series: dict[str, frozenset[str]] = {}
    values: dict[str, frozenset[str]] = {}
    text = path.read_text()
    # only the "## Metrics" section: other tables (spans, …) are not metrics
    start = text.index("## Metrics")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2].startswith("`"):
            continue
        labels_cell = cells[3]
        for label, listed in re.findall(r"`(\w+)`(?:\s*\(([^)]*)\))?", labels_cell):
            enumerated = re.findall(r"`([^`]+)`", listed)
            if enumerated and "e.g." not in listed:
                values[label] = frozenset(enumerated)
        labels = frozenset(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels_cell)))
        for name in re.findall(r"`([^`]+)`", cells[2]):
            for expanded in _expand(name):
                series[expanded] = labels
    if not series:
        raise ValueError(f"no metric table found in {path}")
    return Contract(series, values)
