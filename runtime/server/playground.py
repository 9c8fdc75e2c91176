"""The playground at `/`: one static page (static/playground.html, package data) that chats with the
server's own OpenAI API from the browser. Read once at start-up; nothing is fetched from elsewhere."""
from __future__ import annotations

from importlib.resources import files

from aiohttp import web

_PAGE = web.AppKey("radixlm_playground_page", bytes)
# The page talks only to this server: forbid every other origin for scripts, styles and requests.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_bytes() -> bytes:
    return files("radixlm.runtime.server").joinpath("static/playground.html").read_bytes()


async def playground(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_PAGE], content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    app[_PAGE] = page_bytes()
    app.router.add_get("/", playground)
    app.router.add_get("/playground", playground)
