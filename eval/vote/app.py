"""The voting web app (Starlette): voter page, JSON API, image URLs, admin page.

Routes::

    GET  /vote?t=TOKEN            the voter's page (403 without a valid voter token)
    GET  /api/next                the pair to judge now, questions still open, progress
    POST /api/vote                {"pair_id", "question", "choice": "A"|"B"|"tie"}
    GET  /image/{pair_id}/{A|B}   an image of a pair served to this voter (opaque: the URL
                                  names no model; PNG text metadata is stripped)
    GET  /admin?t=ADMIN_TOKEN     progress per voter and comparison
    GET  /api/admin/progress      the same as JSON

The token travels as the ``X-Token`` header (or ``?t=``). Status codes: 403 for a bad
or missing token and for a pair not served to this voter, 404 for an unknown image or
one whose file is outside the image folder, 409 for a second vote on the same pair and
question, 400 for a malformed vote.
"""

from __future__ import annotations

import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from eval.vote.db import CHOICES, QUESTIONS, Voter, VoteStore
from eval.vote.pages import ADMIN_PAGE, FORBIDDEN_PAGE, VOTE_PAGE

_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = {b"tEXt", b"iTXt", b"zTXt"}


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE)


def create_app(store: VoteStore, image_root: str | Path) -> Starlette:
    """The app over a vote store; images are read only from under ``image_root``."""
    root = Path(image_root).resolve()

    def who(request: Request, role: str | None = None) -> Voter | None:
        token = request.headers.get("x-token") or request.query_params.get("t")
        voter = store.voter_for(token)
        if voter is None or (role is not None and voter.role != role):
            return None
        return voter

    def vote_page(request: Request) -> Response:
        if who(request) is None:
            return HTMLResponse(FORBIDDEN_PAGE, status_code=403, headers=_NO_STORE)
        return HTMLResponse(VOTE_PAGE, headers=_NO_STORE)

    def admin_page(request: Request) -> Response:
        if who(request, "admin") is None:
            return HTMLResponse(FORBIDDEN_PAGE, status_code=403, headers=_NO_STORE)
        return HTMLResponse(ADMIN_PAGE, headers=_NO_STORE)

    def api_next(request: Request) -> Response:
        voter = who(request)
        if voter is None:
            return _error(403, "invalid or missing token")
        return JSONResponse(store.next_task(voter), headers=_NO_STORE)

    async def api_vote(request: Request) -> Response:
        voter = who(request)
        if voter is None:
            return _error(403, "invalid or missing token")
        try:
            body = json.loads(await request.body())
            pair_id, question, choice = int(body["pair_id"]), str(body["question"]), str(body["choice"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'expected JSON {"pair_id": int, "question": str, "choice": "A"|"B"|"tie"}')
        if question not in QUESTIONS or choice not in CHOICES:
            return _error(400, f"question must be one of {list(QUESTIONS)} and choice one of {list(CHOICES)}")
        from starlette.concurrency import run_in_threadpool

        res = await run_in_threadpool(store.cast, voter, pair_id, question, choice)
        progress = {"done": res.done, "total": res.total}
        if res.status == "not_served":
            return _error(403, "this pair was not served to you")
        if res.status == "duplicate":
            return JSONResponse(
                {"error": "already voted on this pair and question", "progress": progress},
                status_code=409,
                headers=_NO_STORE,
            )
        return JSONResponse({"ok": True, "progress": progress}, headers=_NO_STORE)

    def image(request: Request) -> Response:
        voter = who(request)
        if voter is None:
            return PlainTextResponse("invalid or missing token", status_code=403)
        side = request.path_params["side"]
        pair_id = request.path_params["pair_id"]
        if side not in ("A", "B"):
            return PlainTextResponse("not found", status_code=404)
        sides = store.served_sides(voter.id, pair_id)
        if sides is None and voter.role != "admin":
            return PlainTextResponse("this pair was not served to you", status_code=403)
        pair = store.pair(pair_id)
        if pair is None:
            return PlainTextResponse("not found", status_code=404)
        a_model = sides[0] if sides else pair["model_x"]
        model = a_model if side == "A" else (pair["model_y"] if a_model == pair["model_x"] else pair["model_x"])
        rel = pair["path_x"] if model == pair["model_x"] else pair["path_y"]
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return Response(strip_png_text(path.read_bytes()), media_type=media, headers=_NO_STORE)

    def admin_progress(request: Request) -> Response:
        if who(request, "admin") is None:
            return _error(403, "invalid or missing admin token")
        return JSONResponse(store.progress(), headers=_NO_STORE)

    def index(request: Request) -> Response:
        return PlainTextResponse("Voting server. Open the invite link you were given.")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/vote", vote_page),
            Route("/admin", admin_page),
            Route("/api/next", api_next),
            Route("/api/vote", api_vote, methods=["POST"]),
            Route("/image/{pair_id:int}/{side}", image),
            Route("/api/admin/progress", admin_progress),
        ]
    )
