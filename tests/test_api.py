"""The HTTP contract: auth and scope (docs/api.md), validation, JSON errors, report headers."""

from __future__ import annotations

import time
from datetime import date, timedelta

import jwt
import psycopg
import pytest

from tests.conftest import Api

PREFIX = "/api/v1/optimized-reports"
REPORTS = ("dashboard", "bookings", "professionals", "realtime")


def assert_error(response: object, status: int, code: str | None = None) -> None:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize("report", REPORTS)
async def test_every_report_answers_an_admin_and_the_owner(
    api: Api, data: dict[str, int], report: str
) -> None:
    owner = api.token("owner", [data["lisbon"]])
    for token in (api.token("admin"), owner):
        response = await api.report(report, token, salon_id=data["lisbon"])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"


async def test_dashboard_figures_for_a_small_salon(api: Api, data: dict[str, int]) -> None:
    body = (await api.report("dashboard", salon_id=data["lisbon"])).json()
    assert body["meta"]["timezone"] == "Europe/Lisbon"
    assert body["bookings_total"] == 4
    assert body["by_status"]["completed"] == 3
    assert body["by_status"]["cancelled"] == 1
    assert body["revenue_cents"] == 9000
    assert body["average_ticket_cents"] == 3000
    assert body["completion_rate"] == 0.75
    assert body["unique_clients"] == 2
    assert body["new_clients"] == 2
    assert body["returning_clients"] == 0
    assert len(body["daily"]) == 30
    assert sum(day["bookings"] for day in body["daily"]) == 4


async def test_platform_wide_report_covers_every_salon(api: Api, data: dict[str, int]) -> None:
    body = (await api.report("dashboard")).json()
    assert body["meta"] == {**body["meta"], "salon_id": None, "timezone": "UTC"}
    assert body["bookings_total"] == 6
    assert body["revenue_cents"] == 3 * 3000 + 2500


# -- authentication: 401 ------------------------------------------------------------------


def _forge(claims: dict[str, object], key: str, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


async def test_missing_token_is_401(api: Api, data: dict[str, int]) -> None:
    response = await api.get(f"{PREFIX}/dashboard", params={"salon_id": data["lisbon"]})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(
            lambda secret: _forge(
                {"sub": "x", "role": "admin", "exp": int(time.time()) + 60}, "wrong-key" * 5
            ),
            id="bad-signature",
        ),
        pytest.param(
            lambda secret: _forge(
                {"sub": "x", "role": "admin", "exp": int(time.time()) - 60}, secret
            ),
            id="expired-beyond-the-leeway",
        ),
        pytest.param(
            lambda secret: jwt.encode(
                {"sub": "x", "role": "admin", "exp": int(time.time()) + 60}, None, algorithm="none"
            ),
            id="alg-none",
        ),
        pytest.param(
            lambda secret: _forge(
                {"sub": "x", "role": "root", "exp": int(time.time()) + 60}, secret
            ),
            id="unknown-role",
        ),
        pytest.param(lambda secret: _forge({"sub": "x", "role": "admin"}, secret), id="no-exp"),
        pytest.param(
            lambda secret: _forge(
                {"sub": "x", "role": "owner", "salon_ids": "1", "exp": int(time.time()) + 60},
                secret,
            ),
            id="salon-ids-not-a-list",
        ),
        pytest.param(lambda secret: "not.a.jwt", id="garbage"),
    ],
)
async def test_bad_tokens_are_401(api: Api, data: dict[str, int], make_token: object) -> None:
    token = make_token(api.settings.jwt_secret)  # type: ignore[operator]
    response = await api.report("dashboard", token, salon_id=data["lisbon"])
    assert_error(response, 401, "unauthorized")


async def test_tampered_salon_ids_are_401(api: Api, data: dict[str, int]) -> None:
    token = api.token("owner", [data["newyork"]])
    header, _payload, signature = token.split(".")
    other = _forge(
        {"sub": "x", "role": "owner", "salon_ids": [data["lisbon"]], "exp": int(time.time()) + 60},
        "k" * 40,
    )
    tampered = ".".join([header, other.split(".")[1], signature])
    response = await api.report("dashboard", tampered, salon_id=data["lisbon"])
    assert_error(response, 401)


# -- scope: 403 -----------------------------------------------------------------------------


@pytest.mark.parametrize("report", REPORTS)
async def test_owner_of_one_salon_cannot_read_another(
    api: Api, data: dict[str, int], report: str
) -> None:
    token = api.token("owner", [data["newyork"]])
    assert_error(await api.report(report, token, salon_id=data["lisbon"]), 403, "forbidden")


@pytest.mark.parametrize("report", REPORTS)
async def test_owner_cannot_read_platform_wide(api: Api, data: dict[str, int], report: str) -> None:
    token = api.token("owner", [data["lisbon"], data["newyork"]])
    assert_error(await api.report(report, token), 403, "forbidden")


@pytest.mark.parametrize("report", REPORTS)
async def test_ops_sees_no_business_data(api: Api, data: dict[str, int], report: str) -> None:
    assert_error(await api.report(report, api.token("ops"), salon_id=data["lisbon"]), 403)


async def test_cache_clear_is_admin_only(api: Api, data: dict[str, int]) -> None:
    for token in (api.token("ops"), api.token("owner", [data["lisbon"]])):
        response = await api.http.post(
            f"{PREFIX}/cache/clear", json={}, headers={"Authorization": f"Bearer {token}"}
        )
        assert_error(response, 403)


async def test_unknown_salon_is_404_but_only_after_scope(api: Api, data: dict[str, int]) -> None:
    assert_error(await api.report("dashboard", salon_id=99_999), 404, "salon_not_found")
    # An owner probing a salon it does not own learns nothing about whether it exists.
    owner = api.token("owner", [data["lisbon"]])
    assert_error(await api.report("dashboard", owner, salon_id=99_999), 403)


# -- validation: 4xx, never 500 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "params", "status"),
    [
        ("dashboard", {"start": "2026-03-10", "end": "2026-03-01"}, 422),
        ("dashboard", {"start": "2025-01-01", "end": "2026-01-02"}, 422),
        ("dashboard", {"start": "2026-02-30"}, 422),
        ("dashboard", {"start": "yesterday"}, 422),
        ("dashboard", {"start": "2026-1-1"}, 422),
        ("dashboard", {"salon_id": "abc"}, 422),
        ("dashboard", {"salon_id": "-4"}, 422),
        ("dashboard", {"salon_id": "0"}, 422),
        ("dashboard", {"salon_id": str(2**70)}, 422),
        ("bookings", {"granularity": "year"}, 422),
        ("bookings", {"status": "lost"}, 422),
        ("bookings", {"professional_id": "1.5"}, 422),
        ("professionals", {"limit": "0"}, 422),
        ("professionals", {"limit": "201"}, 422),
        ("professionals", {"cursor": "%%%"}, 400),
        ("professionals", {"cursor": "eyJhZnRlciI6LTF9"}, 400),
    ],
)
async def test_bad_parameters_are_clear_client_errors(
    api: Api, data: dict[str, int], report: str, params: dict[str, str], status: int
) -> None:
    params = {"salon_id": str(data["lisbon"]), **params}
    assert_error(await api.report(report, **params), status)


async def test_a_full_366_day_period_is_accepted(api: Api, data: dict[str, int]) -> None:
    end = date(2026, 6, 30)
    start = end - timedelta(days=365)
    response = await api.report(
        "bookings",
        salon_id=data["lisbon"],
        start=start.isoformat(),
        end=end.isoformat(),
        granularity="month",
    )
    assert response.status_code == 200


async def test_unknown_path_and_method_are_json(api: Api) -> None:
    assert_error(await api.get("/nope"), 404)
    response = await api.http.delete(f"{PREFIX}/dashboard")
    assert_error(response, 405)


# -- pagination ---------------------------------------------------------------------------


async def test_professionals_cursor_walks_every_page(api: Api, db: psycopg.Connection) -> None:
    from tests.factories import add_professional, add_salon

    salon = add_salon(db, "Big", "UTC")
    ids = [add_professional(db, salon, f"Pro {i}") for i in range(7)]
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        params: dict[str, object] = {"salon_id": salon, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = (await api.report("professionals", **params)).json()
        seen += [item["professional_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        # A professional added mid-walk lands after the cursor without shifting the pages.
        add_professional(db, salon, "Newcomer") if len(seen) == 3 else None
    assert seen[:7] == ids
    assert len(seen) == 8


# -- probes -------------------------------------------------------------------------------


async def test_probes_need_no_token_and_expose_no_business_data(api: Api) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = (await api.get("/readyz")).json()
    assert ready["database"] == "ok"
    assert ready["redis"] == "ok"
    assert (await api.get("/openapi.json")).status_code == 200
