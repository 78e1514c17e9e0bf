"""The built-in performance page (``GET /performance``)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["operations"])
