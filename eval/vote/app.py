"""The voting web app (Starlette): voter page, JSON API, image URLs, admin pages.

Routes::

    GET  /vote?t=TOKEN             the voter's page
    GET  /api/next                 the pair to judge now, questions still open, progress
    POST /api/vote                 {"pair_id": int, "question": str, "choice": "A"|"B"|"tie"}
    GET  /image/{pair_id}/{A|B}    an image of a pair served to this voter, at the pair's common
                                   size (opaque: the URL names no model; no PNG text metadata)
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
- 404: an unknown image, or one whose file is outside the image folder;
- 409: a second vote on the same pair and question (``code: duplicate``), or a vote
  before both images of the pair were sent to this voter (``code: images_not_loaded``);
- 413: a request body over ``max_body_bytes`` (checked before and while reading it).

Every response carries a Content-Security-Policy (hashed inline scripts only,
``frame-ancestors 'none'``), ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: no-referrer``; API responses and images are ``no-store``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from eval.vote.db import CHOICES, MAX_ID, QUESTIONS, Voter, VoteStore
from eval.vote.display import DisplayMode, image_size, pair_box, render_png
from eval.vote.pages import ADMIN_CANNOT_VOTE_PAGE, ADMIN_PAGE, CSP, FORBIDDEN_PAGE, VOTE_PAGE

_NO_STORE = {"Cache-Control": "no-store"}
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt"}
_ID_RE = re.compile(r"^[1-9][0-9]{0,18}$")
#: The vote body is one flat object; nothing deeper is ever needed.
MAX_JSON_DEPTH = 2
VOTE_KEYS = {"pair_id", "question", "choice"}
_VOTE_SHAPE = 'expected one JSON object {"pair_id": int, "question": str, "choice": "A"|"B"|"tie"}'


def strip_png_text(data: bytes) -> bytes:
    """Drop a PNG's text chunks (they name the model and settings) and keep the rest
    byte for byte; anything that is not a well-formed PNG comes back unchanged.

    Written by hand because re-encoding with PIL would cost a decode and an encode
    per request; the PNG chunk layout (length, type, data, CRC) is all it needs.
    """
    if not data.startswith(_PNG_SIG):
        return data
    out, i = [_PNG_SIG], len(_PNG_SIG)
    while i + 8 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        ctype = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > len(data):
            return data
        if ctype not in _TEXT_CHUNKS:
            out.append(data[i:end])
        i = end
    return b"".join(out)


def parse_id(text: str) -> int | None:
    """A positive 63-bit integer written plainly (``1`` .. ``2**63 - 1``, no sign, no leading
    zero), else None. Anything larger would overflow SQLite's integer."""
    if not _ID_RE.match(text):
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
        doc = json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_no_repeated_keys)
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
    """ASGI middleware: adds :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str, code: str | None = None, **extra) -> JSONResponse:
    doc = {"error": message, **({"code": code} if code else {}), **extra}
    return JSONResponse(doc, status_code=status, headers=_NO_STORE)


def create_app(
    store: VoteStore,
    image_root: str | Path,
    display: DisplayMode = "letterbox",
    background: str = "#ffffff",
    max_body_bytes: int = 4096,
    cache_dir: str | Path | None = None,
) -> Starlette:
    """The app over a vote store; images are read only from under ``image_root``.

    Both images of a pair are served at one size (``display``: letterbox or crop, see
    :mod:`eval.vote.display`); resized images are cached under ``cache_dir`` (default:
    ``display/`` beside the database).
    """
    root = Path(image_root).resolve()
    cache = Path(cache_dir) if cache_dir else store.path.parent / "display"

    def who(request: Request, role: str | None = None) -> Voter | None:
        token = request.headers.get("x-token") or request.query_params.get("t")
        voter = store.voter_for(token)
        if voter is None or (role is not None and voter.role != role):
            return None
        return voter

    def inside_root(rel: str) -> Path | None:
        path = (root / rel).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def pair_image(pair: dict, which: str) -> tuple[bytes, str] | None:
        """Bytes and media type of the pair's ``x`` or ``y`` image at the pair's common size."""
        px, py = inside_root(pair["path_x"]), inside_root(pair["path_y"])
        if px is None or py is None:
            return None
        path = px if which == "x" else py
        try:
            sx, sy = image_size(px), image_size(py)
        except Exception:  # noqa: BLE001 - an unreadable file is a 404, not a 500
            return None
        if sx == sy:
            media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
            return strip_png_text(path.read_bytes()), media
        box = pair_box(sx, sy, display)
        stamp = f"{px}:{px.stat().st_mtime_ns}:{py}:{py.stat().st_mtime_ns}:{box}:{display}:{background}"
        name = f"{pair['id']}-{which}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.png"
        cached = cache / name
        if not cached.is_file():
            data = render_png(path, box, display, background)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, cached)  # atomic: a concurrent request reads the old file or the new one
            return data, "image/png"
        return cached.read_bytes(), "image/png"

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
        if got is None:
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
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
        if got is None:
            return PlainTextResponse("not found", status_code=404, headers=_NO_STORE)
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

    app = Starlette(
        routes=[
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
    )
    app.add_middleware(SecurityHeaders)
    return app
