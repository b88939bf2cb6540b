"""The voting app over HTTP (in-process client): tokens, paths, blindness, status codes."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from eval.vote.app import create_app, strip_png_text
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs


@pytest.fixture
def setup(tmp_path, images_table):
    store = VoteStore(tmp_path / "votes.sqlite")
    store.add_pairs(build_pairs(images_table.read())[0])
    voter, admin = store.add_voter("ann"), store.add_voter("boss", role="admin")
    client = TestClient(create_app(store, tmp_path / "images"))
    return store, client, voter, admin


def test_bad_or_missing_token_is_403(setup):
    _, client, voter, admin = setup
    for path in (
        "/vote",
        "/vote?t=nope",
        "/api/next",
        "/admin",
        "/api/admin/progress",
        "/image/1/A",
        f"/admin?t={voter}",
        "/image/1/A?t=nope",
    ):
        assert client.get(path).status_code == 403, path
    assert client.post("/api/vote", json={"pair_id": 1, "question": "visual_appeal", "choice": "A"}).status_code == 403
    assert client.get(f"/vote?t={voter}").status_code == 200
    assert client.get(f"/admin?t={admin}").status_code == 200


def test_vote_flow_status_codes(setup):
    store, client, voter, _ = setup
    h = {"X-Token": voter}
    task = client.get("/api/next", headers=h).json()
    pid = task["pair_id"]
    assert "alpha" not in str(task) and "beta" not in str(task)  # blind: no model names
    not_served = next(i for i in range(1, 5) if i != pid)
    assert (
        client.post(
            "/api/vote", headers=h, json={"pair_id": not_served, "question": "visual_appeal", "choice": "A"}
        ).status_code
        == 403
    )
    assert client.get(f"/image/{not_served}/A", headers=h).status_code == 403
    assert client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "x", "choice": "A"}).status_code == 400
    assert client.post("/api/vote", headers=h, content=b"not json").status_code == 400
    ok = client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "visual_appeal", "choice": "A"})
    assert ok.status_code == 200 and ok.json()["progress"]["done"] == 1
    again = client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "visual_appeal", "choice": "B"})
    assert again.status_code == 409
    assert len(store.votes_rows()) == 1


def test_images_are_blind_and_confined(setup, tmp_path):
    store, client, voter, admin = setup
    h = {"X-Token": voter}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    a, b = client.get(f"/image/{pid}/A", headers=h), client.get(f"/image/{pid}/B", headers=h)
    assert a.status_code == b.status_code == 200 and a.content != b.content
    assert a.content.startswith(b"\x89PNG") and b"alpha" not in a.content and b"beta" not in a.content
    assert client.get(f"/image/{pid}/C", headers=h).status_code == 404
    assert client.get("/image/999/A", headers={"X-Token": admin}).status_code == 404
    assert client.get("/image/../../etc/passwd", headers=h).status_code == 404
    assert client.get(f"/image/{pid}/%2e%2e%2f%2e%2e%2fvotes.sqlite", headers=h).status_code == 404
    # a pair whose stored path leaves the image folder is never served
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    store._conn().execute("UPDATE pairs SET path_x='../secret.png', path_y='../secret.png' WHERE id=?", (pid,))
    assert client.get(f"/image/{pid}/A", headers=h).status_code == 404
    store._conn().execute("UPDATE pairs SET path_x=?, path_y=? WHERE id=?", (str(secret), str(secret), pid))
    assert client.get(f"/image/{pid}/B", headers=h).status_code == 404


def test_admin_progress(setup):
    _, client, voter, admin = setup
    h = {"X-Token": voter}
    pid = client.get("/api/next", headers=h).json()["pair_id"]
    client.post("/api/vote", headers=h, json={"pair_id": pid, "question": "text_faithfulness", "choice": "tie"})
    prog = client.get("/api/admin/progress", headers={"X-Token": admin}).json()
    assert prog["votes"] == 1 and prog["pairs"] == 4
    ann = next(v for v in prog["voters"] if v["name"] == "ann")
    assert ann["votes"] == 1 and ann["total"] == 8 and ann["served"] == 1


def test_strip_png_text_keeps_pixels(tmp_path, images_table):
    import io

    from PIL import Image

    f = next((tmp_path / "images" / "png").rglob("*.png"))
    raw = f.read_bytes()
    stripped = strip_png_text(raw)
    assert b"tEXt" in raw and b"tEXt" not in stripped
    assert Image.open(io.BytesIO(stripped)).tobytes() == Image.open(f).tobytes()
    assert strip_png_text(b"not a png") == b"not a png"
