"""The playground: ``GET /`` serves one self-contained page (``serve/api/static``: HTML, CSS, plain
JS; package data, no build step, no CDN), which talks to this server's own streaming API with
``stream_trace`` and draws the canvas filling in block by block.

The page and its two assets carry no secrets, so they are open like ``/health`` (the page asks
for the API key and sends it with its API calls); everything else keeps the key check.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse

from serve.api.protocol import APIError
from serve.api.security import PAGE_HEADERS

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}
HEADERS = {"Cache-Control": "no-cache", **PAGE_HEADERS}

router = APIRouter()


def is_open(path: str) -> bool:
    """The playground's own paths (served without the API key)."""
    return path == "/" or (path.startswith("/static/") and path[len("/static/"):] in ASSETS)


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no route GET /static/{name}", code="not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
