/*
 * The performance page of salon-reports (served at /performance).
 *
 * Asks for a bearer token once and keeps it in this closure only (no cookie, no storage),
 * polls /api/v1/optimized-reports/performance/stats every few seconds (?refresh=N seconds,
 * 1-60, default 5) and draws what it gets as inline SVG: no library, no network but this
 * service. Text from the server is only ever set with textContent.
 *
 * STATS_FIELDS lists every field of the stats response the page reads, in one place:
 * tests/test_page.py checks each exists in a real response (one worker and two), and the
 * browser test checks the page read no other (every read goes through `watch`, which records
 * the paths).
 */
"use strict";

(() => {
  // The API prefix is the server's (service/paths.py), filled into the page.
  const API_PREFIX = document.querySelector('meta[name="api-prefix"]').content;
  const STATS_URL = `${API_PREFIX}/performance/stats`;
  const TARGET_MS = 100; // the target: report query p95 under 100 ms (docs/performance.md)
  const ALERT_MS = 500; // the query-time alert (telemetry/README.md)
  const MEMORY_LINE = 0.8; // the memory alert (telemetry/README.md)
  const FRESHNESS_LINE = 5; // seconds: the freshness alert (telemetry/README.md)
  const PAGE_BURN = 14.4; // the fast error-budget page: 14.4x over 1 h and 5 min (docs/slo.md)
  const HISTORY_LIMIT = 720; // an hour of samples at the default refresh
  const TABLE_ROWS = 15;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Path syntax: "a.b" a field, "a.*.b" every entry of the map a, "a[].b" every element of a.
  const STATS_FIELDS = [
    "workers",
    "partial",
    "taken_at",
    "last_5m.endpoints.*.count",
    "last_5m.endpoints.*.errors",
    "last_5m.endpoints.*.p50_ms",
    "last_5m.endpoints.*.p95_ms",
    "last_5m.endpoints.*.p99_ms",
    "last_5m.queries.*.calls",
    "last_5m.queries.*.mean_ms",
    "last_5m.queries.*.p95_ms",
    "last_5m.queries.*.max_ms",
    "last_5m.queries.*.slow_calls",
    "last_5m.cache.hit_rate",
    "last_5m.cache.lookups",
    "last_5m.cache.by_report.*.hits",
    "last_5m.cache.by_report.*.stale",
    "last_5m.cache.by_report.*.misses",
    "last_5m.cache.by_report.*.bypass",
    "last_5m.cache.by_report.*.errors",
    "last_5m.cache.by_report.*.hit_rate",
    "pool.size",
    "pool.in_use",
    "pool.waiting",
    "pool.timeouts_last_5m",
    "pool.workers[].worker",
    "pool.workers[].size",
    "pool.workers[].in_use",
    "pool.workers[].waiting",
    "memory.rss_bytes",
    "memory.limit_bytes",
    "memory.usage_ratio",
    "memory.hosts[].host",
    "memory.hosts[].rss_bytes",
    "memory.hosts[].limit_bytes",
    "freshness.last_5m.applied",
    "freshness.last_5m.p50_s",
    "freshness.last_5m.p99_s",
    "freshness.last_5m.max_s",
    "freshness.change_stream.state",
    "freshness.change_stream.reason",
    "freshness.change_stream.backlog_bytes",
    "freshness.change_stream.retained_wal_bytes",
    "freshness.change_stream.consumers",
    "recent_slow_queries[].timestamp",
    "recent_slow_queries[].name",
    "recent_slow_queries[].duration_ms",
    "recent_slow_queries[].rows",
    "recent_slow_queries[].route",
    "recent_slow_queries[].worker",
    "recent_slow_queries[].trace_id",
    "n_plus_one.total",
    "n_plus_one.last_5m",
    "n_plus_one.recent[].timestamp",
    "n_plus_one.recent[].route",
    "n_plus_one.recent[].count",
    "n_plus_one.recent[].statement",
    "n_plus_one.recent[].worker",
    "n_plus_one.recent[].trace_id",
    "statements.available",
    "statements.reason",
    "statements.since",
    "statements.top_by_total_time[].summary",
    "statements.top_by_total_time[].query",
    "statements.top_by_total_time[].calls",
    "statements.top_by_total_time[].total_ms",
    "statements.top_by_total_time[].mean_ms",
    "statements.top_by_total_time[].rows",
    "statements.top_by_total_time[].shared_blocks_hit",
    "statements.top_by_total_time[].shared_blocks_read",
    "fairness.settings.max_concurrent_per_tenant",
    "fairness.settings.queue_per_tenant",
    "fairness.since_start.throttled.*",
    "fairness.now.waiting.*",
    "fairness.tenants[].tenant",
    "fairness.tenants[].class",
    "fairness.tenants[].salon_id",
    "fairness.tenants[].running",
    "fairness.tenants[].waiting",
    "fairness.tenants[].admitted_last_5m",
    "fairness.tenants[].queued_last_5m",
    "fairness.tenants[].throttled_last_5m",
    "fairness.tenants[].last_throttled_at",
    "slo.partial",
    "slo.since",
    "slo.period_days",
    "slo.objectives.*.objective",
    "slo.objectives.*.budget_left",
    "slo.objectives.*.windows.30d.requests",
    "slo.objectives.*.windows.30d.bad",
    "slo.objectives.*.windows.5m.burn_rate",
    "slo.objectives.*.windows.1h.burn_rate",
    "alerts[].name",
    "alerts[].breached",
    "alerts[].value",
    "alerts[].threshold",
    "alerts[].detail",
  ];
  const MAPS = new Set(
    STATS_FIELDS.filter((f) => f.includes(".*")).map((f) => f.slice(0, f.indexOf(".*"))),
  );
  const fieldsRead = new Set();

  /** A read-only view of parsed JSON that records the STATS_FIELDS-style path of each read. */
  function watch(value, path) {
    if (value === null || typeof value !== "object") return value;
    return new Proxy(value, {
      get(target, key) {
        const child = target[key];
        if (typeof key === "symbol") return child;
        let childPath;
        if (Array.isArray(target)) {
          if (!/^\d+$/.test(key)) return child; // length, map, filter, ...
          childPath = `${path}[]`;
        } else if (MAPS.has(path)) {
          childPath = `${path}.*`;
        } else {
          if (!Object.hasOwn(target, key) && key in Object.prototype) return child;
          childPath = path ? `${path}.${key}` : key;
        }
        fieldsRead.add(childPath);
        return watch(child, childPath);
      },
    });
  }

  const COLORS = {
    p50: "#7fb3e6",
    p95: "#2f6fb3",
    p99: "#173d66",
    mean: "#9fd3a8",
    max: "#1c6b32",
    hits: "#2e9d57",
    stale: "#9ed6a9",
    misses: "#f0a03c",
    bypass: "#b8bec7",
    errors: "#d64541",
    target: "#2e9d57",
    alert: "#d64541",
    overall: "#2f6fb3",
  };
  const REPORT_COLORS = ["#8e5ec7", "#e07b39", "#3aa6a0", "#c7508e", "#6b8e23", "#8c6d46"];

  // -- small DOM and SVG helpers --------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    for (const child of children) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function withTitle(node, text) {
    node.append(svg("title", {}, text));
    return node;
  }

  function canvas(width, height, label) {
    return svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      width: "100%",
      role: "img",
      "aria-label": label,
      preserveAspectRatio: "xMinYMin meet",
    });
  }

  function empty(container, message) {
    container.replaceChildren(el("p", { class: "empty" }, message));
  }

  function fmtMs(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 100) return `${Math.round(value)}`;
    if (value >= 10) return value.toFixed(1);
    return value.toFixed(2);
  }

  function pct(ratio) {
    return ratio === null || ratio === undefined ? "–" : `${(ratio * 100).toFixed(1)} %`;
  }

  function mib(bytes) {
    return `${(bytes / 1048576).toFixed(0)} MiB`;
  }

  function clock(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString();
  }

  /** "GET /api/v1/optimized-reports/dashboard" -> "GET …/dashboard" (the title keeps it all). */
  function shortRoute(route) {
    return route.replace(` ${API_PREFIX}/`, " …/");
  }

  function truncate(text, length) {
    return text.length > length ? `${text.slice(0, length - 1)}…` : text;
  }

  // -- charts -----------------------------------------------------------------------------

  /**
   * Horizontal bars on a log scale, one group per row, with the target and alert lines.
   * rows: [{label, note, values: {key: ms}}]; series: [{key, label}].
   */
  function latencyChart(container, rows, series, what) {
    if (rows.length === 0) return empty(container, `No ${what} in the last 5 minutes.`);
    const width = 960;
    const left = 340;
    const right = width - 24;
    const top = 34;
    const bar = 7;
    const rowHeight = series.length * bar + 22;
    const height = top + rows.length * rowHeight + 8;
    const values = rows.flatMap((row) => series.map((s) => row.values[s.key])).filter((v) => v > 0);
    const low = 10 ** Math.floor(Math.log10(Math.max(0.01, Math.min(...values, 1))));
    const high = 10 ** Math.ceil(Math.log10(Math.max(1000, ...values)));
    const x = (ms) =>
      left + ((Math.log10(Math.max(ms, low)) - Math.log10(low)) / Math.log10(high / low)) * (right - left);
    const chart = canvas(width, height, `${what}: latency per row on a log scale`);
    chart.classList.add("latency");

    for (let tick = low; tick <= high * 1.001; tick *= 10) {
      chart.append(svg("line", { x1: x(tick), x2: x(tick), y1: top - 6, y2: height - 8, class: "grid" }));
      chart.append(
        svg("text", { x: x(tick), y: top - 10, class: "tick", "text-anchor": "middle" }, tick >= 1 ? `${tick} ms` : `${+tick.toFixed(2)} ms`),
      );
    }
    let y = top;
    for (const row of rows) {
      const label = svg("text", { x: 0, y: y + 10, class: "label" }, truncate(shortRoute(row.label), 44));
      chart.append(withTitle(label, row.label));
      chart.append(svg("text", { x: 0, y: y + 24, class: "note" }, row.note));
      series.forEach((s, index) => {
        const value = row.values[s.key];
        if (!(value > 0)) return;
        const rect = svg("rect", {
          x: left,
          y: y + index * bar,
          width: Math.max(1, x(value) - left),
          height: bar - 1,
          fill: COLORS[s.key],
          class: `bar bar-${s.key}`,
          "data-ms": value,
        });
        chart.append(withTitle(rect, `${row.label}: ${s.label} ${fmtMs(value)} ms`));
      });
      y += rowHeight;
    }
    for (const [ms, kind, label] of [
      [TARGET_MS, "target", `target ${TARGET_MS} ms`],
      [ALERT_MS, "alert", `alert ${ALERT_MS} ms`],
    ]) {
      chart.append(svg("line", { x1: x(ms), x2: x(ms), y1: top - 4, y2: height - 8, class: `threshold ${kind}` }));
      const at = { x: x(ms) - 4, y: height - 10, class: `threshold-label ${kind}`, "text-anchor": "end" };
      chart.append(svg("text", at, label));
    }
    const legend = el("p", { class: "legend" });
    for (const s of series) {
      legend.append(el("span", { class: `swatch swatch-${s.key}` }), `${s.label} `);
    }
    container.replaceChildren(chart, legend);
  }

  function drawEndpoints(stats) {
    const rows = Object.entries(stats.last_5m.endpoints).map(([route, e]) => ({
      label: route,
      note: `p50 ${fmtMs(e.p50_ms)} · p95 ${fmtMs(e.p95_ms)} · p99 ${fmtMs(e.p99_ms)} ms · ${e.count} req${e.errors ? ` · ${e.errors} errors` : ""}`,
      values: { p50: e.p50_ms, p95: e.p95_ms, p99: e.p99_ms },
      sort: e.p95_ms || 0,
    }));
    rows.sort((a, b) => b.sort - a.sort);
    latencyChart(
      document.getElementById("chart-endpoints"),
      rows,
      [
        { key: "p50", label: "p50" },
        { key: "p95", label: "p95" },
        { key: "p99", label: "p99" },
      ],
      "requests",
    );
  }

  function drawQueries(stats) {
    const rows = Object.entries(stats.last_5m.queries).map(([name, q]) => ({
      label: name,
      note: `mean ${fmtMs(q.mean_ms)} · p95 ${fmtMs(q.p95_ms)} · max ${fmtMs(q.max_ms)} ms · ${q.calls} calls${q.slow_calls ? ` · ${q.slow_calls} slow` : ""}`,
      values: { mean: q.mean_ms, p95: q.p95_ms, max: q.max_ms },
      sort: q.p95_ms || 0,
    }));
    rows.sort((a, b) => b.sort - a.sort);
    latencyChart(
      document.getElementById("chart-queries"),
      rows,
      [
        { key: "mean", label: "mean" },
        { key: "p95", label: "p95" },
        { key: "max", label: "max" },
      ],
      "report queries",
    );
  }

  const history = []; // [{at: ms since epoch, overall: ratio|null, reports: {name: ratio|null}}]
  const reportColor = new Map();

  function remember(stats) {
    const reports = {};
    for (const [name, counts] of Object.entries(stats.last_5m.cache.by_report)) {
      reports[name] = counts.hit_rate;
      if (!reportColor.has(name)) {
        reportColor.set(name, REPORT_COLORS[reportColor.size % REPORT_COLORS.length]);
      }
    }
    history.push({ at: Date.now(), overall: stats.last_5m.cache.hit_rate, reports });
    if (history.length > HISTORY_LIMIT) history.shift();
  }

  function drawHitRate(stats) {
    const container = document.getElementById("chart-hit-rate");
    const width = 480;
    const height = 240;
    const left = 44;
    const right = width - 12;
    const top = 12;
    const bottom = height - 28;
    // Anchored at "now" on the right; the window grows to the left up to the history kept.
    const last = history[history.length - 1].at;
    const first = Math.min(history[0].at, last - 12 * refreshSeconds * 1000);
    const x = (at) => left + ((at - first) / (last - first)) * (right - left);
    const y = (ratio) => bottom - ratio * (bottom - top);
    const chart = canvas(width, height, "cache hit rate over time");
    chart.classList.add("hit-rate");
    for (const ratio of [0, 0.25, 0.5, 0.75, 1]) {
      chart.append(svg("line", { x1: left, x2: right, y1: y(ratio), y2: y(ratio), class: "grid" }));
      chart.append(svg("text", { x: left - 6, y: y(ratio) + 4, class: "tick", "text-anchor": "end" }, `${ratio * 100} %`));
    }
    const seconds = Math.round((last - first) / 1000);
    chart.append(svg("text", { x: left, y: height - 8, class: "tick" }, `${seconds} s ago`));
    chart.append(svg("text", { x: right, y: height - 8, class: "tick", "text-anchor": "end" }, "now"));
    // The hit rate and its threshold are the stats' own (telemetry/README.md, "Cache hit rate").
    const low = stats.alerts.find((entry) => entry.name === "cache_hit_rate").threshold;
    chart.append(svg("line", { x1: left, x2: right, y1: y(low), y2: y(low), class: "threshold alert" }));
    chart.append(svg("text", { x: right - 4, y: y(low) - 5, class: "threshold-label alert", "text-anchor": "end" }, `alert below ${Math.round(low * 100)} %`));

    const line = (pick, cssClass, color) => {
      let d = "";
      let pen = "M";
      let points = 0;
      for (const sample of history) {
        const ratio = pick(sample);
        if (ratio === null || ratio === undefined) {
          pen = "M";
          continue;
        }
        d += `${pen}${x(sample.at).toFixed(1)},${y(ratio).toFixed(1)} `;
        pen = "L";
        points += 1;
      }
      if (points === 0) return;
      chart.append(svg("path", { d: d.trim(), class: cssClass, stroke: color, "data-points": points }));
      const lastSample = [...history].reverse().find((s) => pick(s) !== null && pick(s) !== undefined);
      chart.append(svg("circle", { cx: x(lastSample.at), cy: y(pick(lastSample)), r: 3, fill: color }));
    };
    for (const [name, color] of reportColor) line((s) => s.reports[name], "series report", color);
    line((s) => s.overall, "series overall", COLORS.overall);

    const legend = el("p", { class: "legend" });
    legend.append(el("span", { class: "swatch swatch-overall" }), `all reports: ${pct(stats.last_5m.cache.hit_rate)} of ${stats.last_5m.cache.lookups} lookups `);
    for (const [name, color] of reportColor) {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = color;
      legend.append(swatch, `${name} `);
    }
    container.replaceChildren(chart, legend);
  }

  function drawCache(stats) {
    const container = document.getElementById("chart-cache");
    const reports = Object.entries(stats.last_5m.cache.by_report);
    if (reports.length === 0) return empty(container, "No cache lookups in the last 5 minutes.");
    const parts = ["hits", "stale", "misses", "bypass", "errors"];
    const width = 480;
    const left = 110;
    const right = width - 12;
    const rowHeight = 44;
    const height = reports.length * rowHeight + 6;
    const chart = canvas(width, height, "cache lookups by report and result");
    chart.classList.add("cache");
    reports.forEach(([name, counts], index) => {
      const y = index * rowHeight + 4;
      const values = parts.map((part) => [part, counts[part]]);
      const total = values.reduce((sum, [, n]) => sum + n, 0);
      chart.append(svg("text", { x: 0, y: y + 14, class: "label" }, name));
      chart.append(svg("text", { x: left, y: y + 38, class: "note" }, `${values.map(([p, n]) => `${p} ${n}`).join(" · ")} · hit rate ${pct(counts.hit_rate)}`));
      let start = left;
      for (const [part, count] of values) {
        if (!count) continue;
        const span = (count / total) * (right - left);
        chart.append(withTitle(svg("rect", { x: start, y, width: span, height: 20, fill: COLORS[part], class: `bar bar-${part}` }), `${name}: ${count} ${part}`));
        start += span;
      }
    });
    const legend = el("p", { class: "legend" });
    for (const part of parts) legend.append(el("span", { class: `swatch swatch-${part}` }), `${part} `);
    container.replaceChildren(chart, legend);
  }

  /** One labelled gauge: value of max, an optional mark (a ratio of max), a danger flag. */
  function gauge(chart, y, label, value, max, text, danger, mark) {
    const left = 110;
    const right = 468;
    chart.append(svg("text", { x: 0, y: y + 14, class: "label" }, truncate(label, 16)));
    chart.append(svg("rect", { x: left, y, width: right - left, height: 20, class: "track" }));
    const ratio = max > 0 ? Math.min(1, value / max) : 0;
    chart.append(svg("rect", { x: left, y, width: Math.max(ratio > 0 ? 2 : 0, ratio * (right - left)), height: 20, class: danger ? "fill danger" : "fill" }));
    if (mark !== undefined) {
      const at = left + mark * (right - left);
      chart.append(svg("line", { x1: at, x2: at, y1: y - 4, y2: y + 24, class: "threshold alert" }));
    }
    chart.append(svg("text", { x: left, y: y + 38, class: "note" }, text));
  }

  function drawPool(stats) {
    const container = document.getElementById("chart-pool");
    const pool = stats.pool;
    if (!pool) return empty(container, "No connection pool reported.");
    const workers = pool.workers.length > 1 ? pool.workers : [];
    const chart = canvas(480, 48 * (1 + workers.length) + 6, "connection pool in use against its maximum");
    chart.classList.add("pool");
    const exhausted = (p) => p.waiting > 0 || (p.size > 0 && p.in_use >= p.size);
    gauge(chart, 4, workers.length ? "all workers" : "pool", pool.in_use, pool.size,
      `${pool.in_use} of ${pool.size} in use · ${pool.waiting} waiting · ${pool.timeouts_last_5m} timeouts in 5 min`, exhausted(pool));
    workers.forEach((w, index) => {
      gauge(chart, 52 + index * 48, `worker ${w.worker}`, w.in_use, w.size,
        `${w.in_use} of ${w.size} in use · ${w.waiting} waiting`, exhausted(w));
    });
    container.replaceChildren(chart);
  }

  function drawMemory(stats) {
    const container = document.getElementById("chart-memory");
    const memory = stats.memory;
    if (!memory) return empty(container, "No memory reported.");
    const hosts = memory.hosts;
    const chart = canvas(480, 48 * hosts.length + 6, "resident memory against its limit");
    chart.classList.add("memory");
    hosts.forEach((host, index) => {
      const limited = host.limit_bytes > 0;
      const ratio = limited ? host.rss_bytes / host.limit_bytes : null;
      gauge(chart, 4 + index * 48, host.host, host.rss_bytes, limited ? host.limit_bytes : host.rss_bytes,
        limited ? `${mib(host.rss_bytes)} of ${mib(host.limit_bytes)} (${pct(ratio)}) · alert above 80 %` : `${mib(host.rss_bytes)} · no limit reported`,
        ratio !== null && ratio > MEMORY_LINE, limited ? MEMORY_LINE : undefined);
    });
    const total = el("p", { class: "legend" },
      `${mib(memory.rss_bytes)} resident in all${memory.limit_bytes ? ` of ${mib(memory.limit_bytes)}` : ""} · worst host ${pct(memory.usage_ratio)}`);
    container.replaceChildren(chart, total);
  }

  function seconds(value) {
    return value === null || value === undefined ? "–" : `${value < 10 ? value.toFixed(2) : value.toFixed(0)} s`;
  }

  function drawFreshness(stats) {
    const container = document.getElementById("chart-freshness");
    const lags = stats.freshness.last_5m;
    const stream = stats.freshness.change_stream;
    const chart = canvas(480, 54, "commit to applied lag, p99 against the alert line");
    chart.classList.add("freshness");
    const p99 = lags.p99_s ?? 0;
    gauge(chart, 4, "lag p99", p99, FRESHNESS_LINE * 2,
      `p50 ${seconds(lags.p50_s)} · p99 ${seconds(lags.p99_s)} · max ${seconds(lags.max_s)} · ${lags.applied} writes in 5 min`,
      p99 > FRESHNESS_LINE, 0.5);
    const state = stream
      ? `stream ${stream.state}${stream.reason ? ` (${stream.reason})` : ""} · ${stream.consumers} consumer${stream.consumers === 1 ? "" : "s"} · backlog ${mib(stream.backlog_bytes)} · slot keeps ${mib(stream.retained_wal_bytes)} of WAL`
      : "no change stream reported";
    const legend = el("p", { class: stream && stream.state !== "current" ? "legend warning" : "legend" }, state);
    container.replaceChildren(chart, legend);
  }

  function burn(rate) {
    return rate === null || rate === undefined ? "–" : `${rate < 10 ? rate.toFixed(2) : rate.toFixed(0)}×`;
  }

  /** Per SLO: the budget left over the 30 days, the burn rates over 5 min and 1 h. */
  function drawBudget(stats) {
    const container = document.getElementById("chart-budget");
    const slo = stats.slo;
    const names = Object.keys(slo.objectives);
    const chart = canvas(480, 48 * names.length + 6, "error budget left per SLO");
    chart.classList.add("budget");
    names.forEach((name, index) => {
      const objective = slo.objectives[name];
      const windows = objective.windows;
      const left = objective.budget_left;
      const fast = [windows["5m"].burn_rate, windows["1h"].burn_rate];
      const paging = fast.every((rate) => rate !== null && rate > PAGE_BURN);
      const month = windows["30d"];
      gauge(chart, 4 + index * 48, name, Math.max(0, left ?? 1), 1,
        `${pct(objective.objective)}: ${left === null ? "no request" : `${pct(left)} left`} · burn 5m ${burn(fast[0])} · 1h ${burn(fast[1])} · ${month.bad} bad of ${month.requests}`,
        paging || (left !== null && left <= 0));
    });
    const source = slo.partial
      ? `this worker only, since ${clock(slo.since)}: Redis could not be read`
      : `all workers, over ${slo.period_days} days${slo.since ? ` (counted since ${new Date(slo.since).toLocaleDateString()})` : ""}`;
    const legend = el("p", { class: slo.partial ? "legend warning" : "legend" },
      `${source} · burn 1× spends the budget in exactly ${slo.period_days} days; the page alert is ${PAGE_BURN}× over 1 h and 5 min`);
    container.replaceChildren(chart, legend);
  }

  // -- tables and the banner ----------------------------------------------------------------

  const jaegerUrl = (() => {
    const raw = document.querySelector('meta[name="jaeger-url"]')?.content ?? "";
    try {
      const url = new URL(raw);
      return url.protocol === "http:" || url.protocol === "https:" ? raw.replace(/\/+$/, "") : "";
    } catch {
      return "";
    }
  })();

  function traceCell(traceId) {
    if (typeof traceId !== "string" || !/^[0-9a-f]{32}$/.test(traceId)) return el("td", {}, "–");
    if (!jaegerUrl) return el("td", { class: "mono" }, traceId);
    const link = el("a", {
      href: `${jaegerUrl}/trace/${traceId}`,
      target: "_blank",
      rel: "noopener noreferrer",
      class: "trace mono",
      title: `open trace ${traceId} in Jaeger`,
    }, `${traceId.slice(0, 16)}…`);
    return el("td", {}, link);
  }

  function workerCell(worker) {
    const id = String(worker);
    return el("td", { class: "mono", title: `worker ${id}` }, truncate(id, 9));
  }

  function fillTable(id, items, cells, none) {
    const body = document.querySelector(`#${id} tbody`);
    if (items.length === 0) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: "8", class: "empty" }, none)));
      return;
    }
    body.replaceChildren(...items.map((item) => el("tr", {}, ...cells(item))));
  }

  function drawTables(stats) {
    const slow = stats.recent_slow_queries;
    document.getElementById("slow-counts").textContent =
      slow.length > TABLE_ROWS ? `newest ${TABLE_ROWS} of the last ${slow.length}` : "newest first";
    fillTable("table-slow", slow.slice(0, TABLE_ROWS), (q) => [
      el("td", {}, clock(q.timestamp)),
      el("td", {}, q.name),
      el("td", { class: "num" }, fmtMs(q.duration_ms)),
      el("td", { class: "num" }, String(q.rows)),
      el("td", {}, q.route ?? "–"),
      workerCell(q.worker),
      traceCell(q.trace_id),
    ], "No slow query since the service started.");
    const n = stats.n_plus_one;
    document.getElementById("n-plus-one-counts").textContent = `${n.last_5m} in the last 5 min · ${n.total} since start`;
    fillTable("table-n-plus-one", n.recent.slice(0, TABLE_ROWS), (d) => [
      el("td", {}, clock(d.timestamp)),
      el("td", {}, d.route),
      el("td", { class: "num" }, String(d.count)),
      el("td", { class: "mono", title: d.statement }, truncate(d.statement, 90)),
      workerCell(d.worker),
      traceCell(d.trace_id),
    ], "No N+1 pattern detected.");
    drawTenants(stats);
  }

  /** Which salons wait for, or were refused, their share of the database (service/fairness.py). */
  function drawTenants(stats) {
    const fairness = stats.fairness;
    const total = (counts) => Object.keys(counts).reduce((sum, name) => sum + counts[name], 0);
    const limits = fairness.settings;
    document.getElementById("tenant-counts").textContent =
      `${total(fairness.now.waiting)} waiting now · ${total(fairness.since_start.throttled)} throttled since start · ` +
      `share ${limits.max_concurrent_per_tenant} running + ${limits.queue_per_tenant} queued per tenant`;
    const rows = fairness.tenants.slice(0, TABLE_ROWS);
    fillTable("table-tenants", rows, (t) => {
      const who = t.salon_id === null ? t.tenant : `salon ${t.salon_id}`;
      return [
        el("td", { class: t.waiting > 0 || t.throttled_last_5m > 0 ? "mono hot" : "mono" }, who),
        el("td", {}, t.class),
        el("td", { class: "num" }, String(t.running)),
        el("td", { class: "num" }, String(t.waiting)),
        el("td", { class: "num" }, String(t.admitted_last_5m)),
        el("td", { class: "num" }, String(t.queued_last_5m)),
        el("td", { class: "num" }, String(t.throttled_last_5m)),
        el("td", {}, t.last_throttled_at ? clock(t.last_throttled_at) : "–"),
      ];
    }, "No report computed in the last 5 minutes.");
  }

  function drawStatements(stats) {
    const statements = stats.statements;
    const note = document.getElementById("statements-note");
    const reason = statements.reason;
    if (!statements.available) {
      note.textContent = `unavailable: ${reason}`;
      fillTable("table-statements", [], () => [], "pg_stat_statements cannot be read.");
      return;
    }
    note.textContent = statements.since ? `since ${new Date(statements.since).toLocaleString()}` : "";
    fillTable("table-statements", statements.top_by_total_time, (s) => [
      s.summary
        ? el("td", { title: s.query }, s.summary)
        : el("td", { class: "mono", title: s.query }, truncate(s.query, 60)),
      el("td", { class: "num" }, String(s.calls)),
      el("td", { class: "num" }, fmtMs(s.total_ms)),
      el("td", { class: "num" }, fmtMs(s.mean_ms)),
      el("td", { class: "num" }, String(s.rows)),
      el("td", { class: "num" }, String(s.shared_blocks_hit)),
      el("td", { class: "num" }, String(s.shared_blocks_read)),
    ], "No statement recorded yet.");
  }

  function describeAlert(alert) {
    switch (alert.name) {
      case "query_p95":
        return `Query p95 ${fmtMs(alert.value)} ms is over ${alert.threshold} ms (${alert.detail})`;
      case "cache_hit_rate":
        return `Cache hit rate ${pct(alert.value)} is under ${pct(alert.threshold)} (${alert.detail})`;
      case "pool_exhaustion":
        return `Connection pool exhausted: ${alert.detail}`;
      case "memory":
        return `Memory at ${pct(alert.value)} of its limit, over ${pct(alert.threshold)}`;
      case "freshness":
        return `Reports are behind their writes: ${alert.detail}`;
      case "error_budget_burn":
        return `Error budget burning fast: ${alert.detail}`;
      case "tenant_throttling":
        return `Tenants throttled: ${alert.value} ${alert.detail}, over ${alert.threshold} (see the tenants table)`;
      default:
        return `${alert.name} breached${alert.detail ? `: ${alert.detail}` : ""}`;
    }
  }

  function drawAlerts(stats) {
    const banner = document.getElementById("alerts");
    const breached = stats.alerts.filter((alert) => alert.breached);
    banner.classList.toggle("breached", breached.length > 0);
    if (breached.length === 0) {
      banner.replaceChildren(el("strong", {}, "All thresholds OK"), ` (${stats.alerts.length} checked over the last 5 minutes)`);
      return;
    }
    const list = el("ul");
    for (const alert of breached) list.append(el("li", { "data-alert": alert.name }, describeAlert(alert)));
    banner.replaceChildren(el("strong", {}, `${breached.length} threshold${breached.length > 1 ? "s" : ""} breached`), list);
  }

  // -- polling --------------------------------------------------------------------------------

  const refreshSeconds = (() => {
    const asked = Number(new URLSearchParams(window.location.search).get("refresh"));
    return Number.isFinite(asked) && asked >= 1 ? Math.min(asked, 60) : 5;
  })();
  let token = null;
  let timer = null;
  let polls = 0;

  const status = document.getElementById("status");
  const login = document.getElementById("login");
  const loginError = document.getElementById("login-error");
  const dashboard = document.getElementById("dashboard");
  const forget = document.getElementById("forget");

  function signOut(message) {
    token = null;
    clearTimeout(timer);
    dashboard.hidden = true;
    forget.hidden = true;
    login.hidden = false;
    loginError.hidden = !message;
    loginError.textContent = message ?? "";
    status.textContent = "Enter a token to start.";
    document.getElementById("token").focus();
  }

  function render(raw) {
    const stats = watch(raw, "");
    drawAlerts(stats);
    drawEndpoints(stats);
    drawQueries(stats);
    remember(stats);
    drawHitRate(stats);
    drawCache(stats);
    drawPool(stats);
    drawMemory(stats);
    drawFreshness(stats);
    drawBudget(stats);
    drawTables(stats);
    drawStatements(stats);
    const workers = `${stats.workers} worker${stats.workers === 1 ? "" : "s"}`;
    status.textContent = `${workers}${stats.partial ? " (partial: some workers could not be read)" : ""} · stats of ${clock(stats.taken_at)} · every ${refreshSeconds} s`;
    status.classList.toggle("warning", Boolean(stats.partial));
    polls += 1;
    document.body.dataset.polls = String(polls);
  }

  async function poll() {
    if (token === null) return;
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), 10000);
    try {
      const response = await fetch(STATS_URL, {
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        signal: controller.signal,
      });
      if (response.status === 401 || response.status === 403) {
        const body = await response.json().catch(() => null);
        signOut(body?.error?.message ?? `refused (${response.status})`);
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const raw = await response.json();
      if (token === null) return;
      login.hidden = true;
      dashboard.hidden = false;
      forget.hidden = false;
      render(raw);
    } catch (error) {
      status.textContent = `Cannot read the stats (${error.message}); retrying every ${refreshSeconds} s`;
      status.classList.add("warning");
    } finally {
      clearTimeout(timeout);
    }
    if (token !== null) timer = setTimeout(poll, refreshSeconds * 1000);
  }

  login.addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    token = input.value.trim().replace(/^Bearer\s+/i, "");
    input.value = "";
    loginError.hidden = true;
    status.textContent = "Loading…";
    clearTimeout(timer);
    poll();
  });
  forget.addEventListener("click", () => signOut());

  // For tests: the stats paths this page has read (see STATS_FIELDS).
  window.salonReportsPerformance = Object.freeze({
    fieldsRead: () => [...fieldsRead].sort(),
  });
})();
