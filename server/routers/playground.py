"""The playground (`/playground`): a static page that calls the public API from the browser.

Only the files named in FILES are served (no path from the request reaches the file system).
The page holds the API key, so every answer carries a strict Content-Security-Policy: scripts,
styles and requests only from this origin, no frames, no inline code."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files that change with the server's version: always revalidate.
    "Cache-Control": "no-cache",
}

# Not in the OpenAPI schema: the page is no API, and schema fuzzers should not crawl it.
router = APIRouter(tags=["playground"], include_in_schema=False)


def _file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, f"no playground file '{name}'; files: {', '.join(FILES)}")
    body = (PLAYGROUND_DIR / name).read_bytes()
    return Response(body, media_type=FILES[name], headers=HEADERS)


@router.get("/playground")
@router.get("/playground/")
async def index() -> Response:
    return _file("index.html")


@router.get("/playground/{name}")
async def static_file(name: str) -> Response:
    return _file(name)
