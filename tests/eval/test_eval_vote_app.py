"""The voting app over HTTP (in-process client): tokens, paths, blindness, status codes,
the hardening cases (ids, strict JSON, body size, nesting, headers) and the admin."""

from __future__ import annotations

import io
import json
import logging

import pytest
from PIL import Image
from starlette.testclient import TestClient

from eval.vote.app import create_app, json_depth_ok, parse_id
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs

VOTE = {"question": "visual_appeal", "choice": "A"}


@pytest.fixture
def setup(tmp_path, images_table):
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images_table.read()).rows)
    voter, admin = store.add_voter("ann"), store.add_voter("boss", role="admin")
    client = TestClient(create_app(store, tmp_path / "images", size=(40, 24)))
    return store, client, voter, admin


def _serve(client, token: str) -> int:
    """Ask for the next pair and fetch both its images (as the page does); returns the pair id."""
    h = {"X-Token": token}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    for side in "AB":
        assert client.get(f"/image/{pid}/{side}", headers=h).status_code == 200
    return pid


def test_bad_or_missing_token_is_403(setup):
    _, client, voter, admin = setup
    for path in (
        "/vote",
        "/vote?t=nope",
        "/api/next",
        "/admin",
        "/api/admin/progress",
        "/api/admin/pairs",
        "/admin/image/1/x",
        "/image/1/A",
        f"/admin?t={voter}",
        f"/api/admin/pairs?t={voter}",
        f"/admin/image/1/x?t={voter}",
        "/image/1/A?t=nope",
    ):
        assert client.get(path).status_code == 403, path
    assert client.post("/api/vote", json={"pair_id": 1, **VOTE}).status_code == 403
    assert client.get(f"/vote?t={voter}").status_code == 200
    assert client.get(f"/admin?t={admin}").status_code == 200


def test_vote_flow_status_codes(setup):
    store, client, voter, _ = setup
    h = {"X-Token": voter}
    task = client.get("/api/next", headers=h).json()
    pid = task["pair_id"]
    assert "alpha" not in str(task) and "beta" not in str(task)  # blind: no model names
    not_served = next(i for i in range(1, 5) if i != pid)
    assert client.post("/api/vote", headers=h, json={"pair_id": not_served, **VOTE}).status_code == 403
    assert client.get(f"/image/{not_served}/A", headers=h).status_code == 403
    assert client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "x", "choice": "A"}).status_code == 400
    assert client.post("/api/vote", headers={**h, "Content-Type": "application/json"}, content=b"x").status_code == 400
    # a vote counts only after both images were sent
    early = client.post("/api/vote", headers=h, json={"pair_id": pid, **VOTE})
    assert early.status_code == 409 and early.json()["code"] == "images_not_loaded"
    assert client.get(f"/image/{pid}/A", headers=h).status_code == 200
    assert client.post("/api/vote", headers=h, json={"pair_id": pid, **VOTE}).json()["code"] == "images_not_loaded"
    assert client.get(f"/image/{pid}/B", headers=h).status_code == 200
    ok = client.post("/api/vote", headers=h, json={"pair_id": pid, **VOTE})
    assert ok.status_code == 200 and ok.json()["progress"]["done"] == 1
    again = client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "visual_appeal", "choice": "B"})
    assert again.status_code == 409 and again.json()["code"] == "duplicate"
    assert len(store.votes_rows()) == 1


def test_ids_are_positive_63_bit_integers(setup):
    _, client, voter, _ = setup
    h = {"X-Token": voter}
    for bad in ("9223372036854775808", "99999999999999999999999", "0", "-1", "01", "1.0", "abc", "1e3", "%2B1"):
        r = client.get(f"/image/{bad}/A", headers=h)
        assert r.status_code == 400, (bad, r.status_code)
    assert client.get("/image/9223372036854775807/A", headers=h).status_code == 403  # valid id, not served
    assert parse_id("9223372036854775807") == 2**63 - 1 and parse_id("9223372036854775808") is None
    assert parse_id("7") == 7 and parse_id("007") is None and parse_id("") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"pair_id": 1e400, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": 2.9, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": 1.0, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": true, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": "1", "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": null, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": 9223372036854775808, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": 0, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": NaN, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": Infinity, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": [1], "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": {"a": 1}, "question": "visual_appeal", "choice": "A"}',
        b'{"pair_id": 1, "question": ["visual_appeal"], "choice": "A"}',
        b'{"pair_id": 1, "question": "visual_appeal", "choice": 1}',
        b'{"pair_id": 1, "question": "visual_appeal"}',
        b'{"pair_id": 1, "question": "visual_appeal", "choice": "A", "extra": 1}',
        b'{"pair_id": 1, "pair_id": 2, "question": "visual_appeal", "choice": "A"}',
        b'[1, "visual_appeal", "A"]',
        b'"just a string"',
        b"",
        b"\xff\xfe{}",
        b"[" * 2000 + b"]" * 2000,
        b'{"a":' * 600 + b"1" + b"}" * 600,
    ],
)
def test_strict_json_types_are_400(setup, body):
    _, client, voter, _ = setup
    _serve(client, voter)  # a pair is served and loaded: only the body is wrong
    r = client.post("/api/vote", headers={"X-Token": voter, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 400, (body[:60], r.status_code, r.text[:200])
    assert r.json()["code"] == "bad_request"


def test_json_depth_scan():
    assert json_depth_ok(b'{"a": [1, 2]}', 2) and not json_depth_ok(b'{"a": [[1]]}', 2)
    assert json_depth_ok(b'{"a": "[[[[[[ not brackets \\" [[["}', 1)  # brackets inside strings do not count
    assert not json_depth_ok(b"[" * 100_000, 2)


def test_large_bodies_are_413(setup):
    _, client, voter, _ = setup
    h = {"X-Token": voter}
    big = b'{"pair_id": 1, "question": "visual_appeal", "choice": "' + b"A" * (50 * 1024 * 1024) + b'"}'
    r = client.post("/api/vote", headers=h, content=big)
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    sent = []

    def chunks():  # no Content-Length: the limit applies while reading the stream
        for _ in range(64):
            sent.append(1)
            yield b" " * 65536

    json_h = {**h, "Content-Type": "application/json"}
    assert client.post("/api/vote", headers=json_h, content=chunks()).status_code == 413
    r = client.post("/api/vote", headers={**json_h, "Content-Length": "abc"}, content=b"{}")
    assert r.status_code in (400, 413)


def test_security_headers_on_every_response(setup):
    _, client, voter, admin = setup
    pid = _serve(client, voter)
    for r in (
        client.get(f"/vote?t={voter}"),
        client.get(f"/admin?t={admin}"),
        client.get("/vote?t=nope"),
        client.get("/api/next", headers={"X-Token": voter}),
        client.get(f"/image/{pid}/A", headers={"X-Token": voter}),
        client.get("/image/99999999999999999999/A", headers={"X-Token": voter}),
        client.get("/no/such/route"),
        client.post("/api/vote", headers={"X-Token": voter}, content=b"[" * 5000),
    ):
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    page = client.get(f"/vote?t={voter}")
    assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_admin_sees_models_only_on_admin_pages_and_cannot_vote(setup):
    store, client, voter, admin = setup
    ha = {"X-Token": admin}
    assert client.get(f"/vote?t={admin}").status_code == 403
    assert "cannot vote" in client.get(f"/vote?t={admin}").text
    for path in ("/api/next", "/image/1/A", "/image/1/B"):
        r = client.get(path, headers=ha)
        assert r.status_code == 403 and r.json()["code"] == "admin_cannot_vote", path
    assert client.post("/api/vote", headers=ha, json={"pair_id": 1, **VOTE}).status_code == 403
    pairs = client.get("/api/admin/pairs", headers=ha).json()["pairs"]
    assert len(pairs) == 4 and {p["model_x"] for p in pairs} == {"alpha"} and {p["model_y"] for p in pairs} == {"beta"}
    x = client.get("/admin/image/1/x", headers=ha)
    y = client.get("/admin/image/1/y", headers=ha)
    assert x.status_code == y.status_code == 200 and x.content != y.content
    assert client.get("/admin/image/1/z", headers=ha).status_code == 404
    assert client.get("/admin/image/99/x", headers=ha).status_code == 404
    assert client.get("/admin/image/0/x", headers=ha).status_code == 400
    # what the voter is shown as A is the admin's x or y, so the admin view really is the pair
    pid = _serve(client, voter)
    a = client.get(f"/image/{pid}/A", headers={"X-Token": voter}).content
    a_model = store.served_sides(store.voter_for(voter).id, pid)[0]
    which = "x" if a_model == store.pair(pid)["model_x"] else "y"
    assert a == client.get(f"/admin/image/{pid}/{which}", headers=ha).content
    assert store.votes_rows() == []


def test_images_are_blind_and_confined(setup, tmp_path):
    store, client, voter, _ = setup
    h = {"X-Token": voter}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    a, b = client.get(f"/image/{pid}/A", headers=h), client.get(f"/image/{pid}/B", headers=h)
    assert a.status_code == b.status_code == 200 and a.content != b.content
    assert a.content.startswith(b"\xff\xd8") and b"alpha" not in a.content and b"beta" not in a.content
    assert client.get(f"/image/{pid}/C", headers=h).status_code == 404
    assert client.get("/image/999/A", headers=h).status_code == 403  # not served to this voter
    assert client.get("/image/../../etc/passwd", headers=h).status_code == 404
    assert client.get(f"/image/{pid}/%2e%2e%2f%2e%2e%2fvotes.sqlite", headers=h).status_code == 404
    # a pair whose stored path leaves the image folder is never served
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    store._conn().execute("UPDATE pairs SET path_x='../secret.png', path_y='../secret.png' WHERE id=?", (pid,))
    assert client.get(f"/image/{pid}/A", headers=h).status_code == 404
    store._conn().execute("UPDATE pairs SET path_x=?, path_y=? WHERE id=?", (str(secret), str(secret), pid))
    assert client.get(f"/image/{pid}/B", headers=h).status_code == 404


def _mixed_shapes(tmp_path, make_images):
    """Two models at different shapes: "tall" 48 wide x 80 high (red), "square" 64x64 (blue)."""
    import pyarrow as pa

    images = make_images(tmp_path / "images", models=("tall",), n_prompts=2)
    square = make_images(tmp_path / "sq", models=("square",), n_prompts=2, size=64)
    rows = images.read().to_pylist()
    for r in rows:
        Image.new("RGB", (48, 80), (200, 30, 30)).save(tmp_path / "images" / r["image_path"])
        r.update(width=48, height=80)
    for r in square.read().to_pylist():
        rel = r["image_path"]
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "images" / rel)
        rows.append(r)
    return pa.Table.from_pylist(rows)


def test_pairs_of_different_shapes_are_refused_unless_cropped(tmp_path, make_images, caplog):
    """Models generating at different shapes are refused by default (counted, logged as
    an error); with equalise=crop both are served at the study's size, centre-cropped,
    with no bars."""
    table = _mixed_shapes(tmp_path, make_images)
    with caplog.at_level(logging.WARNING):
        refused = build_pairs(table)
    assert refused.rows == [] and refused.skipped == {"size_mismatch:square_vs_tall": 2}
    assert refused.aspect_mismatch == {"square vs tall: 64x64 vs 48x80": 2} and "refused" in caplog.text
    # the same size on both sides but not the study's aspect: refused too
    assert build_pairs(_same(table, 64, 64), size=(64, 40)).skipped == {"size_mismatch:square_vs_tall": 2}
    assert len(build_pairs(_same(table, 64, 64), size=(128, 128)).rows) == 2
    built = build_pairs(table, size=(40, 40), equalise="crop")
    assert len(built.rows) == 2 and not built.skipped
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(built.rows)
    token = store.add_voter("ann")
    client = TestClient(create_app(store, tmp_path / "images", size=(40, 40)))
    h = {"X-Token": token}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    a = Image.open(io.BytesIO(client.get(f"/image/{pid}/A", headers=h).content))
    b = Image.open(io.BytesIO(client.get(f"/image/{pid}/B", headers=h).content))
    assert a.size == b.size == (40, 40) and a.format == b.format == "JPEG"
    tall = a if a.getpixel((20, 20))[0] > 100 else b
    for corner in ((0, 0), (39, 0), (0, 39), (39, 39), (0, 20), (20, 0)):
        assert tall.getpixel(corner)[0] > 150, corner  # cropped, no bars anywhere
    again = client.get(f"/image/{pid}/A", headers=h).content  # served from the cache, same bytes
    assert Image.open(io.BytesIO(again)).tobytes() == a.tobytes()


def _same(table, w: int, h: int):
    import pyarrow as pa

    return pa.Table.from_pylist([{**r, "width": w, "height": h} for r in table.to_pylist()])


def test_admin_progress(setup):
    _, client, voter, admin = setup
    h = {"X-Token": voter}
    pid = _serve(client, voter)
    client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "text_faithfulness", "choice": "tie"})
    prog = client.get("/api/admin/progress", headers={"X-Token": admin}).json()
    assert prog["votes"] == 1 and prog["pairs"] == 4
    ann = next(v for v in prog["voters"] if v["name"] == "ann")
    assert ann["votes"] == 1 and ann["total"] == 8 and ann["served"] == 1


def test_served_image_keeps_only_pixels(tmp_path):
    """The served bytes are a JPEG of the study size with no metadata: EXIF (and its
    orientation, applied to the pixels), ICC profile, comments and PNG chunks are gone."""
    from eval.vote.display import render_file

    exif = Image.Exif()
    exif[0x0131] = "model-one v2"  # Software
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    src = Image.new("RGB", (80, 40), (10, 200, 10))
    src.paste((250, 0, 0), (0, 0, 40, 40))  # left half red: after the rotation, the top half
    src.save(tmp_path / "a.jpg", exif=exif, icc_profile=b"\0" * 200, comment=b"made by model-one")
    out = render_file(tmp_path / "a.jpg", (40, 80))
    assert out.startswith(b"\xff\xd8") and b"model-one" not in out and b"Exif" not in out and b"ICC_PROFILE" not in out
    im = Image.open(io.BytesIO(out))
    assert im.size == (40, 80) and not im.getexif() and "icc_profile" not in im.info
    assert im.getpixel((20, 10))[0] > 200 and im.getpixel((20, 70))[1] > 150  # upright: red on top


def test_votes_must_be_sent_as_json(setup):
    """415 unless the body is declared application/json (UTF-8); a UTF-16 body is 400."""
    _, client, voter, _ = setup
    pid = _serve(client, voter)
    body = json.dumps({"pair_id": pid, "question": "visual_appeal", "choice": "A"}).encode()
    h = {"X-Token": voter}
    for ctype in (
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-16",
        "application/jsonx",
        "multipart/form-data",
    ):
        r = client.post("/api/vote", headers={**h, **({"Content-Type": ctype} if ctype else {})}, content=body)
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type", ctype
        assert r.headers["x-frame-options"] == "DENY"
    utf16 = body.decode().encode("utf-16")
    r = client.post("/api/vote", headers={**h, "Content-Type": "application/json"}, content=utf16)
    assert r.status_code == 400
    r = client.post("/api/vote", headers={**h, "Content-Type": "Application/JSON; charset=UTF-8"}, content=body)
    assert r.status_code == 200


def test_ids_are_matched_whole(setup):
    _, client, voter, admin = setup
    pid = _serve(client, voter)
    for bad in (f"{pid}%0A", f"{pid}%0D", f"%0A{pid}", f"{pid}%20", f"{pid}%00"):
        assert client.get(f"/image/{bad}/A", headers={"X-Token": voter}).status_code == 400, bad
        assert client.get(f"/admin/image/{bad}/x", headers={"X-Token": admin}).status_code == 400, bad
    assert parse_id("1\n") is None and parse_id("1") == 1


def test_slash_redirects_use_the_public_url_never_host_or_token(tmp_path, images_table):
    store = VoteStore(tmp_path / "votes.sqlite")
    token = store.add_voter("ann")
    plain = TestClient(create_app(store, tmp_path / "images", size=(40, 24)), base_url="http://evil.example")
    r = plain.get(f"/vote/?t={token}", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/vote"  # relative, no token
    public = create_app(store, tmp_path / "images", size=(40, 24), public_url="https://vote.example.org/study/")
    client = TestClient(public, base_url="http://evil.example")
    for path in (f"/vote/?t={token}", "/admin/?t=x", "/vote//"):
        r = client.get(
            path, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}, follow_redirects=False
        )
        loc = r.headers["location"]
        assert r.status_code == 308 and loc.startswith("https://vote.example.org/study/"), (path, loc)
        assert "evil" not in loc and token not in loc and "?" not in loc
        assert r.headers["x-frame-options"] == "DENY"
    assert client.get("/api/next/", headers={"X-Token": token}).status_code == 404
    with pytest.raises(ValueError, match="public_url"):
        create_app(store, tmp_path / "images", public_url="javascript:alert(1)")


def test_bad_image_withdraws_its_pair_and_is_410(tmp_path, images_table):
    """A truncated file or a file that is no image: 410 for that pair (never 500), the
    pair withdrawn (not served again, counted for the admin), the next pair served."""
    store = VoteStore(tmp_path / "votes.sqlite", quota=2)
    store.add_pairs(build_pairs(images_table.read()).rows)
    token, admin = store.add_voter("ann"), store.add_voter("boss", role="admin")
    client = TestClient(create_app(store, tmp_path / "images", size=(40, 24)))
    h = {"X-Token": token}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    pair = store.pair(pid)
    (tmp_path / "images" / pair["path_x"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "images" / pair["path_y"]).write_bytes(b"GIF89a not really")
    codes = {client.get(f"/image/{pid}/{s}", headers=h).status_code for s in "AB"}
    assert codes == {410}
    r = client.get(f"/image/{pid}/A", headers=h)
    assert r.json()["code"] == "withdrawn" and r.headers["content-security-policy"]
    assert client.get(f"/admin/image/{pid}/x", headers={"X-Token": admin}).status_code == 410
    nxt = client.get("/api/next", headers=h).json()
    assert nxt["pair_id"] != pid and nxt["progress"]["total"] == 2 * 2  # the quota: 2 pairs x 2 questions
    prog = client.get("/api/admin/progress", headers={"X-Token": admin}).json()
    assert prog["withdrawn"] == 1 and prog["withdrawn_pairs"][0]["pair_id"] == pid
    reason = prog["withdrawn_pairs"][0]["reason"]
    assert reason.startswith(("x: ", "y: ")) and ("truncated" in reason or "cannot identify" in reason), reason
    assert "0x" not in reason  # no object addresses
    assert "withdrawn" in client.get(f"/admin?t={admin}").text
    other = VoteStore(tmp_path / "votes.sqlite").add_voter("bob")  # nobody is served it again
    seen = set()
    for _ in range(4):
        task = client.get("/api/next", headers={"X-Token": other}).json()
        if task["done"]:
            break
        seen.add(task["pair_id"])
        for s in "AB":
            client.get(f"/image/{task['pair_id']}/{s}", headers={"X-Token": other})
        for q in ("visual_appeal", "text_faithfulness"):
            client.post(
                "/api/vote", headers={"X-Token": other}, json={"pair_id": task["pair_id"], "question": q, "choice": "A"}
            )
    assert pid not in seen and len(seen) == 2


def test_unforeseen_errors_are_json_500_with_security_headers(setup, monkeypatch):
    """A bug no route handles still answers with the security headers and no-store (and no traceback)."""
    store, _, voter, _ = setup

    def boom(*a, **k):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(store, "next_task", boom)
    client = TestClient(create_app(store, store.path.parent / "images", size=(40, 24)), raise_server_exceptions=False)
    r = client.get("/api/next", headers={"X-Token": voter})
    assert r.status_code == 500 and r.json() == {"error": "internal error", "code": "internal"}
    assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store" and "secret" not in r.text


def test_prerender_fills_the_cache_and_withdraws_bad_pairs(tmp_path, images_table):
    """`make vote` renders every pair before voters come: a second start renders nothing,
    a pair with an undecodable image is withdrawn before anyone is served it, and the app
    then serves from the cache without rendering."""
    from eval.vote.render_cache import prerender

    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images_table.read()).rows)
    (tmp_path / "images" / store.pair(2)["path_y"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    first = prerender(store, tmp_path / "images", (40, 24))
    assert first["withdrawn"] == 1 and first["rendered"] == 3 * 2 + 1  # pair 2's x rendered before its y failed
    assert store.is_withdrawn(2) and not store.is_withdrawn(1)
    assert prerender(store, tmp_path / "images", (40, 24)) == {"cached": 6}
    app = create_app(store, tmp_path / "images", size=(40, 24))
    client, token = TestClient(app), store.add_voter("ann")
    for _ in range(3):
        pid = _serve(client, token)
        assert pid != 2
        for q in ("visual_appeal", "text_faithfulness"):
            client.post("/api/vote", headers={"X-Token": token}, json={"pair_id": pid, "question": q, "choice": "A"})
    assert client.get("/api/next", headers={"X-Token": token}).json()["done"] is True
    assert app.state.render_cache.rendered == 0  # every image came from the cache


def test_an_unwritable_cache_serves_uncached_and_withdraws_nothing(tmp_path, images_table):
    """A cache folder that cannot be written (here: a file stands where the folder should
    be) is the server's problem, not the image's: the image is served, no pair withdrawn."""
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images_table.read()).rows)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    client = TestClient(create_app(store, tmp_path / "images", size=(40, 24), cache_dir=blocker))
    token = store.add_voter("ann")
    pid = _serve(client, token)
    r = client.get(f"/image/{pid}/A", headers={"X-Token": token})
    assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
    assert store.progress()["withdrawn"] == 0


def test_a_missing_image_withdraws_its_pair(tmp_path, images_table):
    """A file deleted after the pairs were built: 410 and the pair withdrawn, so the voter
    gets another pair instead of the same unvotable one forever."""
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images_table.read()).rows)
    client, token = TestClient(create_app(store, tmp_path / "images", size=(40, 24))), store.add_voter("ann")
    h = {"X-Token": token}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    (tmp_path / "images" / store.pair(pid)["path_x"]).unlink()
    first = [client.get(f"/image/{pid}/{s}", headers=h).status_code for s in "AB"]
    assert sorted(first) in ([200, 410], [410, 410])  # the good side may come first (sides are random)
    assert [client.get(f"/image/{pid}/{s}", headers=h).status_code for s in "AB"] == [410, 410]
    assert store.is_withdrawn(pid) and client.get("/api/next", headers=h).json()["pair_id"] != pid
