"""The voting web app (Starlette): voter page, JSON API, image URLs, admin pages.

Routes::

    GET  /vote?t=TOKEN             the voter's page
    GET  /api/next                 the pair to judge now, questions still open, progress
    POST /api/vote                 {"pair_id": int, "question": str, "choice": "A"|"B"|"tie"}
    GET  /image/{pair_id}/{A|B}    an image of a pair served to this voter (opaque: the URL names no
                                   model), re-encoded by us: one JPEG at the study's size, no metadata
    GET  /admin?t=ADMIN_TOKEN      progress per voter, comparison and pair (models named here only)
    GET  /api/admin/progress       the same as JSON
    GET  /api/admin/pairs          every pair with its models, times served, answers
    GET  /admin/image/{pair_id}/{x|y}  an image of a pair, by model side (admin only)

The token travels as the ``X-Token`` header (or ``?t=``). Voter routes take voter
tokens only: an admin token sees the models, so it cannot vote (403). Status codes:

- 400: a malformed request: an id that is not a positive 63-bit integer, a body that is
  not one JSON object with exactly ``pair_id`` (an integer: no float, no bool, no
  string), ``question`` and ``choice`` (strings from the allowed sets), JSON nested
  deeper than :data:`MAX_JSON_DEPTH`, or with NaN/Infinity or repeated keys;
- 403: a bad, missing or revoked token, an admin token on a voter route, a pair not
  served to this voter;
- 404: an unknown image or path, or an image whose file is outside the image folder;
- 410: a pair whose image file is missing or cannot be decoded: it is withdrawn from
  serving (``code: withdrawn``) and listed on the admin page;
- 409: a second vote on the same pair and question (``code: duplicate``), or a vote
  before both images of the pair were sent to this voter (``code: images_not_loaded``);
- 413: a request body over ``max_body_bytes`` (checked before and while reading it);
- 415: a vote body not sent as ``Content-Type: application/json`` (UTF-8).

No request path is meant to answer 500; an unforeseen exception still gets a JSON 500
with the security headers (logged).

``/vote/`` and ``/admin/`` redirect to the page without the slash, at ``public_url``
(or relative), without the query string: never from the Host header, never with the token.

Every response carries a Content-Security-Policy (hashed inline scripts only,
``frame-ancestors 'none'``), ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: no-referrer``; API responses and images are ``no-store``. The headers
of an image response are the same for every model (type, cache control, security).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from eval.vote.db import CHOICES, MAX_ID, QUESTIONS, Voter, VoteStore
from eval.vote.display import MEDIA_TYPE, BadImage
from eval.vote.pages import ADMIN_CANNOT_VOTE_PAGE, ADMIN_PAGE, CSP, FORBIDDEN_PAGE, VOTE_PAGE
from eval.vote.render_cache import RenderCache, inside
from paradiffusion.log import get_logger

log = get_logger("eval.vote")

_NO_STORE = {"Cache-Control": "no-store"}
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_ID_RE = re.compile(r"[1-9][0-9]{0,18}")  # used with fullmatch: "$" would let "1\n" through
#: The vote body is one flat object; nothing deeper is ever needed.
MAX_JSON_DEPTH = 2
VOTE_KEYS = {"pair_id", "question", "choice"}
_VOTE_SHAPE = 'expected one JSON object {"pair_id": int, "question": str, "choice": "A"|"B"|"tie"}'


def parse_id(text: str) -> int | None:
    """A positive 63-bit integer written plainly (``1`` .. ``2**63 - 1``, no sign, no leading
    zero), else None. Anything larger would overflow SQLite's integer."""
    if not _ID_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def json_depth_ok(data: bytes, max_depth: int) -> bool:
    """Whether the JSON text nests arrays/objects at most ``max_depth`` deep.

    A linear scan (brackets outside strings), run before ``json.loads``: the parser
    recurses once per level, so a body of ten thousand ``[`` would otherwise raise
    ``RecursionError`` deep inside it. Malformed text may pass; the parser rejects it.
    """
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                return False
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return True


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("repeated key")
    return dict(pairs)


def parse_vote(body: bytes) -> tuple[int, str, str] | str:
    """``(pair_id, question, choice)`` from a vote body, or the reason it is refused.

    Types are strict: ``pair_id`` must be a JSON integer in 1 .. 2**63-1 (not ``2.9``,
    not ``true``, not ``"2"``, not ``1e400``); ``question`` and ``choice`` strings
    from the allowed sets; no other keys.
    """
    if not json_depth_ok(body, MAX_JSON_DEPTH):
        return f"JSON nested deeper than {MAX_JSON_DEPTH} levels; {_VOTE_SHAPE}"
    try:
        text = body.decode("utf-8")  # strict: json.loads(bytes) would also take UTF-16/32
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_repeated_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"not valid JSON ({str(exc)[:80]}); {_VOTE_SHAPE}"
    if not isinstance(doc, dict) or set(doc) != VOTE_KEYS:
        return _VOTE_SHAPE
    pair_id, question, choice = doc["pair_id"], doc["question"], doc["choice"]
    if type(pair_id) is not int or not 1 <= pair_id <= MAX_ID:  # noqa: E721 - bool is an int subclass
        return f"pair_id must be a JSON integer from 1 to {MAX_ID}"
    if not isinstance(question, str) or question not in QUESTIONS:
        return f"question must be one of {list(QUESTIONS)}"
    if not isinstance(choice, str) or choice not in CHOICES:
        return f"choice must be one of {list(CHOICES)}"
    return pair_id, question, choice


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class SecurityHeaders:
    """ASGI middleware: adds :data:`SECURITY_HEADERS` to every HTTP response, error
    responses included. An exception no route handled becomes a JSON 500 sent from
    here (with the headers and ``no-store``, logged with its traceback) instead of
    Starlette's bare error page, which sits outside every middleware."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = b'{"error":"internal error","code":"internal"}'
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send_with_headers({"type": "http.response.body", "body": body})


def _error(status: int, message: str, code: str | None = None, **extra) -> JSONResponse:
    doc = {"error": message, **({"code": code} if code else {}), **extra}
    return JSONResponse(doc, status_code=status, headers=_NO_STORE)


def _json_content_type(value: str | None) -> bool:
    """Whether a Content-Type header says JSON in UTF-8 (``application/json``, optionally
    with ``charset=utf-8``); anything else gets 415."""
    if not value:
        return False
    media, _, params = value.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _public_base(public_url: str | None) -> str:
    """The configured public URL without a trailing slash ("" when none: relative redirects)."""
    if not public_url:
        return ""
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"public_url must be http(s)://host[:port][/prefix] with no query, got {public_url!r}")
    return public_url.rstrip("/")


def create_app(
    store: VoteStore,
    image_root: str | Path,
    size: tuple[int, int] = (1024, 640),
    max_body_bytes: int = 4096,
    cache_dir: str | Path | None = None,
    public_url: str | None = None,
) -> Starlette:
    """The app over a vote store; images are read only from under ``image_root``.

    Every served image is rendered to ``size`` (width, height) as one JPEG with no
    metadata (:mod:`eval.vote.display`) and cached under ``cache_dir`` (default:
    ``display/`` beside the database). Redirects are built from ``public_url`` (or are
    relative), never from the request's Host header.
    """
    root = Path(image_root).resolve()
    cache = RenderCache(Path(cache_dir) if cache_dir else store.path.parent / "display", size)
    base = _public_base(public_url)

    def who(request: Request, role: str | None = None) -> Voter | None:
        token = request.headers.get("x-token") or request.query_params.get("t")
        voter = store.voter_for(token)
        if voter is None or (role is not None and voter.role != role):
            return None
        return voter

    def pair_image(pair: dict, which: str) -> tuple[bytes, str] | Response:
        """The served bytes and media type of the pair's ``x`` or ``y`` image, or the error
        response: 404 for a path outside the image folder; 410 for a file that is missing
        or cannot be decoded, and the pair is withdrawn from serving (otherwise a voter
        served it could never load both images, so never vote, and would get it back)."""
        if store.is_withdrawn(pair["id"]):
            return _error(410, "this pair was withdrawn (an image of it cannot be shown)", "withdrawn")
        path = inside(root, pair["path_x"] if which == "x" else pair["path_y"])
        if path is None:
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
        try:
            return cache.get(path), MEDIA_TYPE
        except (BadImage, OSError) as exc:
            if store.withdraw(pair["id"], f"{which}: {exc}"):
                log.warning("pair %d withdrawn: its %s image cannot be shown (%s)", pair["id"], which, exc)
            return _error(410, "this pair was withdrawn (an image of it cannot be shown)", "withdrawn")

    def vote_page(request: Request) -> Response:
        voter = who(request)
        if voter is None:
            return HTMLResponse(FORBIDDEN_PAGE, status_code=403, headers=_NO_STORE)
        if voter.role != "voter":
            return HTMLResponse(ADMIN_CANNOT_VOTE_PAGE, status_code=403, headers=_NO_STORE)
        return HTMLResponse(VOTE_PAGE, headers=_NO_STORE)

    def admin_page(request: Request) -> Response:
        if who(request, "admin") is None:
            return HTMLResponse(FORBIDDEN_PAGE, status_code=403, headers=_NO_STORE)
        return HTMLResponse(ADMIN_PAGE, headers=_NO_STORE)

    def voter_or_error(request: Request) -> Voter | Response:
        voter = who(request)
        if voter is None:
            return _error(403, "invalid or missing token")
        if voter.role != "voter":
            return _error(403, "admin tokens cannot vote (an admin sees the models)", "admin_cannot_vote")
        return voter

    def api_next(request: Request) -> Response:
        voter = voter_or_error(request)
        if isinstance(voter, Response):
            return voter
        return JSONResponse(store.next_task(voter), headers=_NO_STORE)

    async def api_vote(request: Request) -> Response:
        voter = voter_or_error(request)
        if isinstance(voter, Response):
            return voter
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, f"request body over {max_body_bytes} bytes", "too_large")
        if not _json_content_type(request.headers.get("content-type")):
            return _error(415, "send the vote as Content-Type: application/json (UTF-8)", "unsupported_media_type")
        body = await read_body(request, max_body_bytes)
        if body is None:
            return _error(413, f"request body over {max_body_bytes} bytes", "too_large")
        parsed = parse_vote(body)
        if isinstance(parsed, str):
            return _error(400, parsed, "bad_request")
        pair_id, question, choice = parsed
        res = await run_in_threadpool(store.cast, voter, pair_id, question, choice)
        progress = {"done": res.done, "total": res.total}
        if res.status == "not_served":
            return _error(403, "this pair was not served to you", "not_served")
        if res.status == "not_allowed":
            return _error(403, "this token cannot vote", "not_allowed")
        if res.status == "not_loaded":
            return _error(409, "load both images before voting", "images_not_loaded", progress=progress)
        if res.status == "duplicate":
            return _error(409, "already voted on this pair and question", "duplicate", progress=progress)
        return JSONResponse({"ok": True, "progress": progress}, headers=_NO_STORE)

    def image(request: Request) -> Response:
        voter = voter_or_error(request)
        if isinstance(voter, Response):
            return voter
        pair_id = parse_id(request.path_params["pair_id"])
        if pair_id is None:
            return _error(400, f"pair id must be an integer from 1 to {MAX_ID}", "bad_request")
        side = request.path_params["side"]
        if side not in ("A", "B"):
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
        sides = store.served_sides(voter.id, pair_id)
        if sides is None:
            return PlainTextResponse("this pair was not served to you", status_code=403, headers=_NO_STORE)
        pair = store.pair(pair_id)
        if pair is None:
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
        model = sides[0] if side == "A" else sides[1]
        got = pair_image(pair, "x" if model == pair["model_x"] else "y")
        if isinstance(got, Response):
            return got
        store.mark_loaded(voter.id, pair_id, side)
        return Response(got[0], media_type=got[1], headers=_NO_STORE)

    def admin_image(request: Request) -> Response:
        if who(request, "admin") is None:
            return PlainTextResponse("invalid or missing admin token", status_code=403, headers=_NO_STORE)
        pair_id = parse_id(request.path_params["pair_id"])
        if pair_id is None:
            return _error(400, f"pair id must be an integer from 1 to {MAX_ID}", "bad_request")
        which = request.path_params["which"]
        pair = store.pair(pair_id)
        if which not in ("x", "y") or pair is None:
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
        got = pair_image(pair, which)
        if isinstance(got, Response):
            return got
        return Response(got[0], media_type=got[1], headers=_NO_STORE)

    def admin_progress(request: Request) -> Response:
        if who(request, "admin") is None:
            return _error(403, "invalid or missing admin token")
        return JSONResponse(store.progress(), headers=_NO_STORE)

    def admin_pairs(request: Request) -> Response:
        if who(request, "admin") is None:
            return _error(403, "invalid or missing admin token")
        return JSONResponse({"pairs": store.pairs_overview()}, headers=_NO_STORE)

    def index(request: Request) -> Response:
        return PlainTextResponse("Voting server. Open the invite link you were given.")

    routes = [
        Route("/", index),
        Route("/vote", vote_page),
        Route("/admin", admin_page),
        Route("/api/next", api_next),
        Route("/api/vote", api_vote, methods=["POST"]),
        Route("/image/{pair_id}/{side}", image),
        Route("/api/admin/progress", admin_progress),
        Route("/api/admin/pairs", admin_pairs),
        Route("/admin/image/{pair_id}/{which}", admin_image),
    ]
    pages = {"/vote", "/admin"}

    def not_found(request: Request) -> Response:
        """Unknown paths. ``/vote/`` and ``/admin/`` redirect to the page without the slash,
        at the configured public URL (or relative): Starlette's own slash redirect copies
        the Host header and the query string (the token) into ``Location``."""
        path = request.url.path
        if path.endswith("/") and path.rstrip("/") in pages:
            return RedirectResponse(base + path.rstrip("/"), status_code=308, headers=_NO_STORE)
        return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)

    app = Starlette(routes=[*routes, Route("/{rest:path}", not_found, methods=["GET", "HEAD", "POST"])])
    app.router.redirect_slashes = False
    app.state.render_cache = cache
    app.add_middleware(SecurityHeaders)
    return app
