"""The local rating page of a blind session: static page + a small JSON API (Starlette).

Why this file exists: raters score in a browser, and the browser must never learn which model
wrote which answer. The API hands out only `Session.public_item` (prompt + answers by position)
and the rater's own progress; model names, paths and the per-item order stay on the server.

Rules the page relies on:
- every API call carries the session token (`X-Session-Token`; the page reads it from the URL
  fragment, which browsers never send to the server), else 401;
- a rating is checked field by field (`validate_rating`); anything malformed gets 400 and
  writes nothing; ratings of a closed session get 409;
- the page itself has no inline script and a strict Content-Security-Policy, and it shows
  prompts and answers with `textContent`, so an answer holding `<script>` is only text.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxlora.evaluate.blind_session import MAX_BODY, MAX_RATER, Session, validate_rating

STATIC = {"blind.js": "text/javascript", "blind.css": "text/css", "index.html": "text/html"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("jaxlora.evaluate").joinpath("blind_static", name).read_bytes()


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=HEADERS)


def _error(status: int, message: str) -> JSONResponse:
    return _json({"error": message}, status)


def build_blind_app(session: Session) -> Starlette:
    """The ASGI app serving `session`'s page and API."""
    expected = session.token.encode()

    def denied(request: Request):
        got = request.headers.get("x-session-token", "").encode()
        if hmac.compare_digest(got, expected):
            return None
        return _error(401, "missing or wrong session token (open the URL printed by the server)")

    async def page(request: Request):
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            return Response("not found", 404, headers=HEADERS)
        return Response(_static(name), media_type=STATIC[name], headers=HEADERS)

    async def state(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        rater = request.query_params.get("rater", "").strip()
        if len(rater) > MAX_RATER:
            return _error(400, f"`rater` is longer than {MAX_RATER} characters")
        rated = session.rated_by(rater) if rater else []
        todo = [i for i in range(len(session.items)) if i not in set(rated)]
        return _json(
            {
                "n": len(session.items),
                "rated": rated,
                "next": todo[0] if todo else None,
                "closed": session.closed,
            }
        )

    async def item(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        i = request.path_params["i"]
        if not 0 <= i < len(session.items):
            return _error(404, f"no item {i}; items are 0..{len(session.items) - 1}")
        return _json(session.public_item(i))

    async def rate(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(400, "ratings must be sent as application/json")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(400, f"the request body is larger than {MAX_BODY} bytes")
        try:
            rating = validate_rating(json.loads(raw), len(session.items))
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"malformed rating: {e}")
        if session.closed:
            return _error(409, "this session is closed (its report has been written)")
        session.append_rating(rating)
        return _json({"saved": True, "item": rating["item"]})

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", page, methods=["GET"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/api/items/{i:int}", item, methods=["GET"]),
        Route("/api/ratings", rate, methods=["POST"]),
    ]
    return Starlette(routes=routes)
