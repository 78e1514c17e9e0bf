"""The bare FastAPI app ``make loadtest`` compares the service with (SPEC section 11).

A separate, minimal FastAPI application, never an endpoint of the service: one route,
``GET /report``, answering a report-sized JSON body as bytes. The body is the service's own
cached dashboard (the file named by ``BARE_BODY_FILE``, read back and serialised once with
orjson at start), so both send the same number of bytes; without the file, a made-up body of
about the same size. Served by uvicorn with the service's options (``service.cli``), on the
loopback interface, with as many workers as the service under test.

    python -m benchmarks.bare_app --port 8099 [--workers 1] [--body-file dashboard.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import orjson
from fastapi import FastAPI
from starlette.responses import Response

BODY_FILE_VARIABLE = "BARE_BODY_FILE"
PATH = "/report"


def _made_up_body() -> bytes:
    days = [
        {"date": f"2026-11-{day:02d}", "bookings": 40 + day, "revenue": 1234.5 + day}
        for day in range(1, 31)
    ]
    return orjson.dumps({"meta": {"salon_id": 1, "timezone": "Europe/Lisbon"}, "daily": days})


def report_body() -> bytes:
    name = os.environ.get(BODY_FILE_VARIABLE)
    if not name:
        return _made_up_body()
    return orjson.dumps(orjson.loads(Path(name).read_bytes()))


def create_app() -> FastAPI:
    app = FastAPI(title="bare")
    body = report_body()

    @app.get(PATH)
    async def report() -> Response:
        return Response(body, media_type="application/json")

    return app


def main() -> None:
    import uvicorn

    from service.cli import UVICORN_OPTIONS

    parser = argparse.ArgumentParser(description="The bare FastAPI app of the load test.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--body-file", help="a JSON file to answer with")
    args = parser.parse_args()
    if args.body_file:
        os.environ[BODY_FILE_VARIABLE] = args.body_file  # read by every worker's factory
    uvicorn.run(
        "benchmarks.bare_app:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        access_log=False,
        **UVICORN_OPTIONS,  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
