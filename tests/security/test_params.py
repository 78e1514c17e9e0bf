"""Hostile parameters: each is a clear 4xx with the JSON error body, never a 500, never data.

``tests/test_api.py`` holds the first cases (a reversed or 367-day period, 2026-02-30, a few bad
ids, an unknown granularity or status, limit 0/201, two bad cursors). This matrix goes further,
against a real uvicorn server (the in-process client has no limit on URL or header size):
extreme ids and dates, junk and control characters in every parameter, repeated and unknown
parameters, oversized query strings and headers, bad bodies, unknown paths and forged cursors.

Decisions the tests pin down:

- a parameter given twice is a 422, whichever values: a proxy checking the first ``salon_id``
  and the service serving the last would be a hole;
- an integer is written in ASCII digits only ("+7", " 7", "0_7" are 422: pydantic would read
  them as 7, a log or a rate limiter would not; "07" stays 7, as docs/design.md's cache keys say);
- unknown parameters are ignored (the answer is the same as without them);
- dates lie in 1900-01-01 .. 9998-12-31 (beyond, a period's bounds or buckets overflow);
- a query string over 2 KB is a 414 (a request line over what uvicorn parses is its own 400);
- oversized headers are answered correctly (uvicorn with httptools buffers any size: limiting
  them is the front proxy's job, as docs/api.md says; a server that refuses them passes too).
"""

from __future__ import annotations

import base64
import re
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from service.reports.http import DATE_PATTERN
from service.reports.params import EARLIEST_DATE, LATEST_DATE
from tests.security.conftest import PREFIX, REPORTS, LiveServer, assert_json_error, raw_request

# The parameters of each report (besides salon_id, start and end where they apply).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "dashboard": ("salon_id", "start", "end"),
    "bookings": (
        "salon_id",
        "start",
        "end",
        "granularity",
        "professional_id",
        "service_id",
        "status",
    ),
    "professionals": ("salon_id", "start", "end", "limit", "cursor"),
    "realtime": ("salon_id",),
}
# Which error a junk value of a parameter earns.
JUNK_STATUS = {"cursor": (400, "invalid_cursor")}
DEFAULT_JUNK_STATUS = (422, "validation_error")

# Raw, already percent-encoded as they travel: NUL, invalid UTF-8, a lone '%', emoji,
# right-to-left override, injection attempts, whitespace tricks.
JUNK = {
    "emoji": quote("😀🔥"),
    "nul-byte": "%00",
    "nul-after-a-good-value": "1%00",
    "invalid-utf8": "%FF%FE%FD",
    "lone-percent": "%",
    "bad-percent-escape": "%zz",
    "double-encoded": "%2531",
    "rtl-override": quote("\u202e1"),
    "fullwidth-digit": quote("\uff11"),
    "arabic-indic-digits": quote("\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0661"),
    "sql-injection": quote("1; DROP TABLE bookings; --"),
    "sql-quote": quote("1' OR '1'='1"),
    "template-injection": quote("${jndi:ldap://x}{{7*7}}"),
    "html": quote("<script>alert(1)</script>"),
    "newline": "1%0D%0AX-Injected:%201",
    "tab": "%091",
    "json": quote('{"after": 1}'),
    "array-syntax": quote("[1,2]"),
    "very-long-value": "9" * 1000,
}


def _url(report: str, query: str) -> str:
    return f"{PREFIX}/{report}?{query}"


def _admin(live_server: LiveServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {live_server.token('admin')}"}


def _assert_no_echo(response: httpx.Response) -> None:
    """The message names the parameter, never reflects the junk (no XSS, no log forging)."""
    assert "<script>" not in response.text
    assert "X-Injected" not in response.text
    assert "x-injected" not in response.headers


# -- junk in every parameter ----------------------------------------------------------------


@pytest.mark.parametrize("junk", JUNK.values(), ids=JUNK.keys())
@pytest.mark.parametrize(
    ("report", "name"),
    [(report, name) for report, names in PARAMETERS.items() for name in names],
)
def test_junk_in_any_parameter_is_a_clear_client_error(
    live_server: LiveServer, client: httpx.Client, report: str, name: str, junk: str
) -> None:
    query = f"{name}={junk}"
    if name != "salon_id":
        query = f"salon_id={live_server.data['lisbon']}&{query}"
    response = client.get(_url(report, query), headers=_admin(live_server))
    status, code = JUNK_STATUS.get(name, DEFAULT_JUNK_STATUS)
    if name == "cursor" and len(junk) > 200:
        status, code = DEFAULT_JUNK_STATUS  # over the declared max_length
    assert_json_error(response, status, code)
    _assert_no_echo(response)


# -- ids ------------------------------------------------------------------------------------

BAD_IDS = {
    "two-to-the-63": str(2**63),
    "ten-to-the-30": str(10**30),
    "minus-one": "-1",
    "minus-two-to-the-63": str(-(2**63)),
    "zero": "0",
    "negative-zero": "-0",
    "empty": "",
    "letters": "abc",
    "hex": "0x10",
    "float": "1.0",
    "exponent": "1e3",
    "infinity": "inf",
    "nan": "nan",
    "plus-sign": "%2B1",
    "leading-blank": "%201",
    "trailing-blank": "1%20",
    "zeros-only": "000",
    "underscore": "1_0",
    "true": "true",
}
ID_PARAMETERS = [
    ("dashboard", "salon_id"),
    ("realtime", "salon_id"),
    ("bookings", "professional_id"),
    ("bookings", "service_id"),
    ("professionals", "limit"),
]


@pytest.mark.parametrize("value", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize(("report", "name"), ID_PARAMETERS)
def test_bad_integers_are_422(
    live_server: LiveServer, client: httpx.Client, report: str, name: str, value: str
) -> None:
    query = f"{name}={value}"
    if name != "salon_id":
        query = f"salon_id={live_server.data['lisbon']}&{query}"
    assert_json_error(
        client.get(_url(report, query), headers=_admin(live_server)), 422, "validation_error"
    )


@pytest.mark.parametrize("report", REPORTS)
def test_the_largest_id_is_a_plain_404(
    live_server: LiveServer, client: httpx.Client, report: str
) -> None:
    response = client.get(_url(report, f"salon_id={2**63 - 1}"), headers=_admin(live_server))
    assert_json_error(response, 404, "salon_not_found")


@pytest.mark.parametrize("name", ["professional_id", "service_id"])
def test_the_largest_filter_id_filters_everything_out(
    live_server: LiveServer, client: httpx.Client, name: str
) -> None:
    query = f"salon_id={live_server.data['lisbon']}&{name}={2**63 - 1}"
    response = client.get(_url("bookings", query), headers=_admin(live_server))
    assert response.status_code == 200, response.text
    assert sum(point["bookings"] for point in response.json()["series"]) == 0


@pytest.mark.parametrize(
    ("limit", "status"), [("0", 422), ("-1", 422), ("201", 422), ("1", 200), ("200", 200)]
)
def test_limit_bounds(
    live_server: LiveServer, client: httpx.Client, limit: str, status: int
) -> None:
    response = client.get(_url("professionals", f"limit={limit}"), headers=_admin(live_server))
    if status == 200:
        assert response.status_code == 200, response.text
        assert 1 <= len(response.json()["items"]) <= int(limit)
    else:
        assert_json_error(response, status, "validation_error")


# -- dates ----------------------------------------------------------------------------------

BAD_PERIODS = {
    "year-zero": "start=0000-01-01&end=0000-01-02",
    "year-one": "start=0001-01-01&end=0001-01-02",
    "before-1900": "start=1899-12-31&end=1900-01-01",
    "five-digit-year": "start=99999-01-01",
    "end-in-year-9999": "start=9999-12-30&end=9999-12-31",
    "last-representable-day": "start=9999-12-31&end=9999-12-31",
    "only-end-at-the-last-day": "end=9999-12-31",
    "only-end-near-year-one": "end=0001-01-05",
    "february-30": "start=2024-02-30&end=2024-03-01",
    "february-29-in-a-common-year": "start=2023-02-29&end=2023-03-01",
    "month-13": "start=2024-13-01",
    "month-0": "start=2024-00-10",
    "day-0": "start=2024-01-00",
    "day-32": "end=2024-01-32",
    "start-after-end": "start=2024-03-02&end=2024-03-01",
    "367-days": "start=2024-01-01&end=2025-01-01",
    "ten-years": "start=2015-01-01&end=2024-12-31",
    "with-a-time": "start=2024-01-01T00:00:00",
    "with-a-zone": "start=2024-01-01Z",
    "iso-week": "start=2024-W01-1",
    "ordinal-date": "start=2024-001",
    "compact": "start=20240101",
    "slashes": "start=2024%2F01%2F01",
    "negative-year": "start=-2024-01-01",
    "empty": "start=",
    "trailing-newline": "start=2024-01-01%0A",
}


@pytest.mark.parametrize("query", BAD_PERIODS.values(), ids=BAD_PERIODS.keys())
@pytest.mark.parametrize("report", ["dashboard", "bookings", "professionals"])
def test_absurd_periods_are_422(
    live_server: LiveServer, client: httpx.Client, report: str, query: str
) -> None:
    query = f"salon_id={live_server.data['lisbon']}&{query}"
    response = client.get(_url(report, query), headers=_admin(live_server))
    assert_json_error(response, 422, "validation_error")


EDGE_PERIODS = {
    "leap-day": ("2024-02-29", "2024-02-29"),
    "earliest-day": ("1900-01-01", "1900-01-07"),
    "latest-day": ("9998-12-25", "9998-12-31"),
    "a-leap-year-of-366-days": ("2024-01-01", "2024-12-31"),
}


@pytest.mark.parametrize("granularity", ["day", "week", "month"])
@pytest.mark.parametrize(("start", "end"), EDGE_PERIODS.values(), ids=EDGE_PERIODS.keys())
@pytest.mark.parametrize("salon", ["lisbon", "newyork", "platform"])
def test_the_edges_of_the_calendar_are_served(
    live_server: LiveServer,
    client: httpx.Client,
    salon: str,
    start: str,
    end: str,
    granularity: str,
) -> None:
    """Both ends of the accepted range, in time zones either side of UTC, in every bucket size."""
    salon_query = "" if salon == "platform" else f"salon_id={live_server.data[salon]}&"
    period = f"{salon_query}start={start}&end={end}"
    bookings = client.get(
        _url("bookings", f"{period}&granularity={granularity}"), headers=_admin(live_server)
    )
    assert bookings.status_code == 200, bookings.text
    assert bookings.json()["meta"]["start"] == start
    if granularity == "day":
        for report in ("dashboard", "professionals"):
            response = client.get(_url(report, period), headers=_admin(live_server))
            assert response.status_code == 200, response.text


@pytest.mark.parametrize("report", ["dashboard", "bookings", "professionals"])
def test_end_alone_near_the_earliest_day_starts_on_it(
    live_server: LiveServer, client: httpx.Client, report: str
) -> None:
    """The 30 days ending 1900-01-05 begin before the range: they start on 1900-01-01."""
    query = f"salon_id={live_server.data['lisbon']}&end=1900-01-05"
    response = client.get(_url(report, query), headers=_admin(live_server))
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["start"] == "1900-01-01"


def test_the_documented_date_pattern_is_the_accepted_range() -> None:
    pattern = re.compile(DATE_PATTERN)
    for day in (EARLIEST_DATE, LATEST_DATE, date(2024, 2, 29), date(8999, 12, 31)):
        assert pattern.match(day.isoformat()), day
    outside = (EARLIEST_DATE - timedelta(days=1), LATEST_DATE + timedelta(days=1))
    for text in (*(day.isoformat() for day in outside), "2024-13-01", "2024-00-10", "0000-00-00"):
        assert not pattern.match(text), text


# -- repeated and unknown parameters --------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "salon_id={lisbon}&salon_id={newyork}",
        "salon_id={newyork}&salon_id={lisbon}",
        "salon_id={newyork}&salon_id={newyork}",
        "salon_id={lisbon}&start=2026-01-01&start=2026-01-02",
        "salon_id={lisbon}&end=2026-01-01&end=2026-01-02",
    ],
)
@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("role", ["admin", "owner-of-newyork"])
def test_a_repeated_parameter_is_422_whoever_asks(
    live_server: LiveServer, client: httpx.Client, report: str, query: str, role: str
) -> None:
    token = (
        live_server.token("admin")
        if role == "admin"
        else live_server.token("owner", [live_server.data["newyork"]])
    )
    response = client.get(
        _url(report, query.format(**live_server.data)),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert_json_error(response, 422, "validation_error")
    assert "once" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("report", "query"),
    [
        ("bookings", "granularity=day&granularity=week"),
        ("bookings", "status=completed&status=cancelled"),
        ("bookings", "professional_id={pro_lisbon}&professional_id={pro_newyork}"),
        ("bookings", "service_id={cut}&service_id={nails}"),
        ("professionals", "limit=1&limit=200"),
        ("professionals", "cursor=a&cursor=b"),
    ],
)
def test_a_repeated_filter_is_422(
    live_server: LiveServer, client: httpx.Client, report: str, query: str
) -> None:
    query = f"salon_id={live_server.data['lisbon']}&{query.format(**live_server.data)}"
    response = client.get(_url(report, query), headers=_admin(live_server))
    assert_json_error(response, 422, "validation_error")


@pytest.mark.parametrize(
    "extra",
    [
        "foo=bar",
        "_=1732600000000",
        "SALON_ID={newyork}",
        "salon_id[]={newyork}",
        "salon_id%5B0%5D={newyork}",
        "salon%5Fid2={newyork}",
        "admin=true&role=admin",
        quote("😀") + "=" + quote("😀"),
    ],
)
@pytest.mark.parametrize("report", REPORTS)
def test_unknown_parameters_change_nothing(
    live_server: LiveServer, client: httpx.Client, report: str, extra: str
) -> None:
    """Ignored, not half-read: an owner of Lisbon still sees Lisbon, and only Lisbon."""
    owner = {"Authorization": f"Bearer {live_server.token('owner', [live_server.data['lisbon']])}"}
    plain = f"salon_id={live_server.data['lisbon']}"
    expected = client.get(_url(report, plain), headers=owner)
    response = client.get(
        _url(report, f"{plain}&{extra.format(**live_server.data)}"), headers=owner
    )
    assert response.status_code == 200, response.text
    if report == "realtime":  # "as_of" moves
        assert response.json()["salon_id"] == live_server.data["lisbon"]
    else:
        assert response.content == expected.content


# -- sizes (a real server: the in-process client has no limits) -----------------------------


def test_a_query_string_over_2_kb_is_414(live_server: LiveServer, client: httpx.Client) -> None:
    query = f"salon_id={live_server.data['lisbon']}&padding={'x' * 8000}"
    response = client.get(_url("dashboard", query), headers=_admin(live_server))
    assert_json_error(response, 414, "uri_too_long")


def test_a_query_string_of_2_kb_is_still_served(
    live_server: LiveServer, client: httpx.Client
) -> None:
    prefix = f"salon_id={live_server.data['lisbon']}&padding="
    query = prefix + "x" * (2048 - len(prefix))
    assert (client.get(_url("dashboard", query), headers=_admin(live_server))).status_code == 200


def test_many_small_parameters_are_414(live_server: LiveServer, client: httpx.Client) -> None:
    query = "&".join(f"p{i}=1" for i in range(5000))
    response = client.get(_url("dashboard", query), headers=_admin(live_server))
    assert_json_error(response, 414, "uri_too_long")


def test_a_long_query_string_from_a_stranger_is_401(
    live_server: LiveServer, client: httpx.Client
) -> None:
    """Authentication still comes first: size checks tell a stranger nothing either."""
    response = client.get(_url("dashboard", "padding=" + "x" * 8000))
    assert_json_error(response, 401, "unauthorized")


@pytest.mark.parametrize("size", [100_000, 1_000_000])
def test_a_huge_request_line_is_refused_by_the_server_or_the_app(
    live_server: LiveServer, size: int
) -> None:
    """uvicorn (httptools) answers its own 400 to a request line this long; the app would 414."""
    head = (
        f"GET {PREFIX}/dashboard?salon_id={live_server.data['lisbon']}&padding={'x' * size}"
        f" HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {live_server.token('admin')}"
    ).encode()
    response = raw_request(live_server, head)
    assert response.status_code in (400, 414, 431), response.text
    if response.status_code == 414:
        assert_json_error(response, 414, "uri_too_long")


# uvicorn with httptools (what `salon-reports serve` runs) sets no limit on a header's size: it
# buffers even 16 MB. The app must still answer such requests correctly; refusing them is the
# front proxy's job (see docs/api.md), and a server that does (400/413/431) passes too.
SERVER_REFUSALS = (400, 413, 431)


def _with_header(live_server: LiveServer, name: str, value: bytes, token: bool = True) -> bytes:
    head = f"GET {PREFIX}/dashboard?salon_id={live_server.data['lisbon']} HTTP/1.1\r\nHost: t"
    if token:
        head += f"\r\nAuthorization: Bearer {live_server.token('admin')}"
    return head.encode() + b"\r\n" + name.encode() + b": " + value


@pytest.mark.parametrize("name", ["X-Padding", "Cookie", "User-Agent", "If-None-Match"])
def test_a_64_kb_header_is_harmless(live_server: LiveServer, name: str) -> None:
    response = raw_request(live_server, _with_header(live_server, name, b"x" * 64 * 1024))
    if response.status_code not in SERVER_REFUSALS:
        assert response.status_code == 200, response.text
        assert response.json()["meta"]["salon_id"] == live_server.data["lisbon"]


@pytest.mark.parametrize(
    "value",
    [b"Bearer " + b"x" * 64 * 1024, b"Bearer " + b"eyJ" * 22_000 + b".e30.x", b"x" * 64 * 1024],
    ids=["junk", "jwt-shaped", "no-scheme"],
)
def test_a_64_kb_authorization_header_is_401(live_server: LiveServer, value: bytes) -> None:
    response = raw_request(live_server, _with_header(live_server, "Authorization", value, False))
    if response.status_code not in SERVER_REFUSALS:
        assert_json_error(response, 401, "unauthorized")


def test_two_thousand_headers_are_harmless(live_server: LiveServer) -> None:
    head = _with_header(live_server, "X-H", b"0") + b"\r\n"
    head += b"\r\n".join(f"X-H{i}: {'y' * 60}".encode() for i in range(2000))
    response = raw_request(live_server, head)
    if response.status_code not in SERVER_REFUSALS:
        assert response.status_code == 200, response.text


# -- POST /cache/clear bodies ---------------------------------------------------------------

BAD_BODIES: dict[str, tuple[bytes, str | None, int, str]] = {
    "truncated-json": (b'{"report": "dash', "application/json", 422, "validation_error"),
    "not-json": (b"{bad", "application/json", 422, "validation_error"),
    "invalid-utf8": (b"\xff\xfe\xfd", "application/json", 422, "validation_error"),
    "json-array": (b"[1, 2]", "application/json", 422, "validation_error"),
    "json-null": (b"null", "application/json", 422, "validation_error"),
    "json-string": (b'"dashboard"', "application/json", 422, "validation_error"),
    "unknown-field": (b'{"pattern": "*"}', "application/json", 422, "validation_error"),
    "unknown-report": (b'{"report": "revenue"}', "application/json", 422, "validation_error"),
    "report-glob": (b'{"report": "*"}', "application/json", 422, "validation_error"),
    "salon-id-string": (b'{"salon_id": "1"}', "application/json", 422, "validation_error"),
    "salon-id-true": (b'{"salon_id": true}', "application/json", 422, "validation_error"),
    "salon-id-float": (b'{"salon_id": 1.5}', "application/json", 422, "validation_error"),
    "salon-id-zero": (b'{"salon_id": 0}', "application/json", 422, "validation_error"),
    "salon-id-negative": (b'{"salon_id": -1}', "application/json", 422, "validation_error"),
    "salon-id-2-to-the-63": (
        b'{"salon_id": 9223372036854775808}',
        "application/json",
        422,
        "validation_error",
    ),
    # Beyond 2**53 a JSON number is not exact in most parsers (RFC 8259 section 6).
    "salon-id-2-to-the-53": (
        b'{"salon_id": 9007199254740992}',
        "application/json",
        422,
        "validation_error",
    ),
    "salon-id-1e400": (b'{"salon_id": 1e400}', "application/json", 422, "validation_error"),
    "nested-depth-10000": (
        b"[" * 10_000 + b"]" * 10_000,
        "application/json",
        413,
        "payload_too_large",
    ),
    # Parsers keep the last of two equal keys; which one counts must not be a guess.
    "duplicate-keys": (
        b'{"salon_id": 1, "salon_id": 2}',
        "application/json",
        422,
        "validation_error",
    ),
    "text-plain": (b'{"report": "dashboard"}', "text/plain", 415, "unsupported_media_type"),
    "form-encoded": (
        b"report=dashboard",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    "multipart": (
        b"--b\r\nContent-Disposition: form-data; name=report\r\n\r\ndashboard\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
        415,
        "unsupported_media_type",
    ),
    "no-content-type": (b'{"report": "dashboard"}', None, 415, "unsupported_media_type"),
    "json-lookalike-type": (
        b'{"report": "dashboard"}',
        "application/jsonx",
        415,
        "unsupported_media_type",
    ),
    "5-kb-of-blanks-then-json": (
        b" " * 5000 + b"{}",
        "application/json",
        413,
        "payload_too_large",
    ),
    "1-mb": (
        b'{"report": "' + b"x" * 1_000_000 + b'"}',
        "application/json",
        413,
        "payload_too_large",
    ),
}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"), BAD_BODIES.values(), ids=BAD_BODIES.keys()
)
def test_a_bad_cache_clear_body_is_a_clear_client_error(
    live_server: LiveServer,
    client: httpx.Client,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
) -> None:
    headers = _admin(live_server)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post(f"{PREFIX}/cache/clear", content=body, headers=headers)
    assert_json_error(response, status, code)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", None),
        (b"", "application/json"),
        (b"{}", "application/json"),
        (b'{"report": "dashboard"}', "application/json; charset=utf-8"),
        (b'{"report": null, "salon_id": null}', "APPLICATION/JSON"),
        (b'{"salon_id": 7.0}', "application/json"),  # the JSON number 7
        (b'{"salon_id": 9007199254740991}', "application/json"),  # 2**53 - 1
    ],
)
def test_good_cache_clear_bodies_are_accepted(
    live_server: LiveServer, client: httpx.Client, body: bytes, content_type: str | None
) -> None:
    headers = _admin(live_server)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = client.post(f"{PREFIX}/cache/clear", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["deleted"], int)


def test_a_bad_body_from_a_stranger_is_401_not_422(
    live_server: LiveServer, client: httpx.Client
) -> None:
    """The body is read only once the caller is an admin: strangers learn nothing from it."""
    for body in (b"{bad", b"[" * 10_000, b"x" * 100_000):
        response = client.post(
            f"{PREFIX}/cache/clear", content=body, headers={"Content-Type": "application/json"}
        )
        assert_json_error(response, 401, "unauthorized")


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"{PREFIX}/revenue",
        f"{PREFIX}/DASHBOARD",
        f"{PREFIX}/dashboard%00",
        f"{PREFIX}/dash%62oard%2F..",
        f"{PREFIX}/%2e%2e/%2e%2e/etc/passwd",
        f"{PREFIX}/" + quote("😀"),
        f"{PREFIX}/" + "a" * 4000,
        "/api/v2/optimized-reports/dashboard",
        "/api/v1/optimized-reports",
    ],
)
def test_unknown_reports_are_a_json_404(
    live_server: LiveServer, client: httpx.Client, path: str
) -> None:
    response = client.get(path, headers=_admin(live_server))
    assert_json_error(response, 404, "not_found")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "path", [f"{PREFIX}/dashboard", f"{PREFIX}/cache/clear", f"{PREFIX}/performance/stats"]
)
def test_wrong_methods_are_a_json_405(
    live_server: LiveServer, client: httpx.Client, method: str, path: str
) -> None:
    response = client.request(method, path, headers=_admin(live_server))
    assert_json_error(response, 405, "method_not_allowed")


# -- cursors --------------------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


BAD_CURSORS = {
    "after-zero": _cursor({"after": 0}),
    "after-negative": _cursor({"after": -1}),
    "after-2-to-the-63": _cursor({"after": 2**63}),
    "after-a-string": _cursor({"after": "1"}),
    "after-true": _cursor({"after": True}),
    "after-a-float": _cursor({"after": 1.5}),
    "after-null": _cursor({"after": None}),
    "after-a-list": _cursor({"after": [1]}),
    "no-after": _cursor({"before": 1}),
    "a-list": _cursor([1]),
    "a-number": _cursor(1),
    "json-null": _cursor(None),
    "sql-in-after": _cursor({"after": "1 OR 1=1"}),
    "not-base64": "!!!!",
    "base64-of-junk": base64.urlsafe_b64encode(b"\xff\x00\xfe").decode(),
    "standard-base64-alphabet": base64.b64encode(b'{"after":1}>>>').decode(),
    "padding-only": "====",
    "empty": "",
}


@pytest.mark.parametrize("cursor", BAD_CURSORS.values(), ids=BAD_CURSORS.keys())
def test_forged_cursors_are_400(live_server: LiveServer, client: httpx.Client, cursor: str) -> None:
    query = f"salon_id={live_server.data['lisbon']}&cursor={quote(cursor)}"
    response = client.get(_url("professionals", query), headers=_admin(live_server))
    assert_json_error(response, 400, "invalid_cursor")


def test_a_cursor_over_200_characters_is_422(live_server: LiveServer, client: httpx.Client) -> None:
    query = f"cursor={_cursor({'after': 1, 'pad': 'x' * 300})}"
    response = client.get(_url("professionals", query), headers=_admin(live_server))
    assert_json_error(response, 422, "validation_error")


def test_a_cursor_from_another_salon_reveals_nothing_of_it(
    live_server: LiveServer, client: httpx.Client
) -> None:
    """A well-formed cursor only moves within the asker's scope: it is an id, not a grant."""
    data = live_server.data
    owner = {"Authorization": f"Bearer {live_server.token('owner', [data['newyork']])}"}
    for after in (data["pro_lisbon"], data["pro_lisbon"] - 1 or 1, 2**63 - 1):
        query = f"salon_id={data['newyork']}&limit=200&cursor={_cursor({'after': after})}"
        response = client.get(_url("professionals", query), headers=owner)
        assert response.status_code == 200, response.text
        ids = {item["professional_id"] for item in response.json()["items"]}
        assert ids <= {data["pro_newyork"]}
        assert all(item["name"] == "Nia" for item in response.json()["items"])


def test_a_tampered_real_cursor_is_400(live_server: LiveServer, client: httpx.Client) -> None:
    first = client.get(_url("professionals", "limit=1"), headers=_admin(live_server))
    cursor = first.json()["next_cursor"]
    assert cursor
    for tampered in (cursor[:-1], cursor + "A" * 3, cursor[::-1], "x" + cursor[1:]):
        response = client.get(
            _url("professionals", f"limit=1&cursor={quote(tampered)}"), headers=_admin(live_server)
        )
        assert_json_error(response, 400, "invalid_cursor")
