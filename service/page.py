"""The built-in performance page: ``GET /performance`` and the script and style it loads.

The page is a static shell and carries no data, so it answers without a token. It asks for an
admin or ops token once, keeps it in the tab's memory only (no cookie, no storage), and polls
``/api/v1/optimized-reports/performance/stats`` with it every few seconds, drawing the answer
as inline SVG with a small script of its own (``service/static/page.js``: no chart library, no
CDN, no build step). A strict Content-Security-Policy lets the page load only this service's
script and style and talk only to this service; the server fills in the API prefix
(``service.paths``) and the Jaeger UI address (``REPORTS_JAEGER_URL``) its trace links point at.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.deps import ResourcesDep
from service.paths import API_PREFIX

STATIC = Path(__file__).with_name("static")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["operations"])


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def asset(name: str, media_type: str) -> Asset:
    """A file of ``service/static``, read once."""
    body = (STATIC / name).read_bytes()
    return Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


@cache
def page_template() -> Template:
    return Template((STATIC / "performance.html").read_text(encoding="utf-8"))


def jaeger_base_url(url: str) -> str:
    """The Jaeger UI address without a trailing slash; "" unless it is an http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    return url.strip().rstrip("/")


def render_page(jaeger_url: str) -> str:
    return page_template().substitute(
        jaeger_url=html.escape(jaeger_base_url(jaeger_url)), api_prefix=html.escape(API_PREFIX)
    )


@router.get("/performance", include_in_schema=False)
async def performance_page(resources: ResourcesDep) -> Response:
    """The page; its data comes from ``/performance/stats`` with the token the user enters."""
    return Response(
        render_page(resources.settings.jaeger_url),
        media_type="text/html; charset=utf-8",
        headers=PAGE_HEADERS,
    )


def _serve(request: Request, static: Asset) -> Response:
    headers = {
        "ETag": static.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("if-none-match") == static.etag:
        return Response(status_code=304, headers=headers)
    return Response(static.body, media_type=static.media_type, headers=headers)


@router.get("/performance/page.js", include_in_schema=False)
async def performance_script(request: Request) -> Response:
    return _serve(request, asset("page.js", "text/javascript; charset=utf-8"))


@router.get("/performance/page.css", include_in_schema=False)
async def performance_style(request: Request) -> Response:
    return _serve(request, asset("page.css", "text/css; charset=utf-8"))
