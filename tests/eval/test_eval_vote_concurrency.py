"""Many voters at once on a real server (uvicorn on loopback): no vote lost or doubled."""

from __future__ import annotations

from eval.vote.app import create_app
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from eval.vote.server import serve_in_thread
from eval.vote.simulate import run_voters

N_VOTERS = 50
PAIRS_PER_VOTER = 6  # x 2 questions = 12 answers each, 600 in all, plus 600 refused re-sends


def test_fifty_concurrent_voters(tmp_path, make_images):
    images = make_images(tmp_path / "images", models=("m1", "m2", "m3"), n_prompts=6)
    store = VoteStore(tmp_path / "votes.sqlite", quota=PAIRS_PER_VOTER)
    store.add_pairs(build_pairs(images.read())[0])
    tokens = [store.add_voter(f"v{i}") for i in range(N_VOTERS)]
    with serve_in_thread(create_app(store, tmp_path / "images", size=(40, 24))) as url:
        runs = run_voters(url, tokens, retry_duplicate=True)
    assert not [e for r in runs for e in r.errors]
    accepted = sum(r.accepted for r in runs)
    assert accepted == N_VOTERS * PAIRS_PER_VOTER * 2
    assert sum(r.status[409] for r in runs) == sum(r.duplicates_tried for r in runs) == accepted
    rows = store.votes_rows()
    assert len(rows) == accepted  # nothing lost, nothing doubled
    keys = {(r["voter"], r["pair_id"], r["question"]) for r in rows}
    assert len(keys) == len(rows)
    per_voter = {r["voter"] for r in rows}
    assert len(per_voter) == N_VOTERS


def test_64_concurrent_first_image_requests_never_5xx(tmp_path, make_images):
    """64 image requests at once on a real server, none cached yet: 16 images, each asked
    for by 4 voters at the same moment, plus a pair whose image is truncated on disk.
    No 5xx; each good image rendered once; the bad pair is 410 and withdrawn; no temp
    file is left behind."""
    import threading

    import httpx

    images = make_images(tmp_path / "images", n_prompts=9, size=48)
    store = VoteStore(tmp_path / "votes.sqlite", quota=1)
    store.add_pairs(build_pairs(images.read()).rows)
    bad = store.pair(9)
    broken = tmp_path / "images" / bad["path_x"]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated PNG
    cache = tmp_path / "display"
    app = create_app(store, tmp_path / "images", size=(40, 24), cache_dir=cache)
    tokens = [store.add_voter(f"v{i}") for i in range(36)]
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            served = [(t, client.get("/api/next", headers={"X-Token": t}).json()["pair_id"]) for t in tokens]
        good = [(t, p) for t, p in served if p != 9][:32]
        jobs = [(t, p, side) for t, p in good for side in "AB"] + [
            (t, 9, side) for t, p in served if p == 9 for side in "AB"
        ]
        assert len(jobs) >= 64 and len({p for _, p, _ in jobs}) == 9
        barrier = threading.Barrier(len(jobs))
        results: list[int] = []
        limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
        with httpx.Client(base_url=url, timeout=60, limits=limits) as shared:  # thread-safe, one connection each

            def fetch(token: str, pid: int, side: str) -> None:
                barrier.wait()
                results.append(shared.get(f"/image/{pid}/{side}", headers={"X-Token": token}).status_code)

            threads = [threading.Thread(target=fetch, args=job) for job in jobs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    assert len(results) == len(jobs) and not [s for s in results if s >= 500], sorted(results)
    n_bad = sum(1 for _, p, _ in jobs if p == 9)
    assert results.count(200) >= 64 and sum(1 for s in results if s in (410, 200)) == len(results)
    assert results.count(410) >= n_bad // 2  # side x of pair 9 (and y once the pair is withdrawn)
    assert store.is_withdrawn(9) and store.progress()["withdrawn"] == 1
    files = sorted(p.name for p in cache.iterdir())
    # one file per good image (pair 9's good side too, if it came first), no temp file left
    assert len(files) in (16, 17) and all(f.endswith(".jpg") and not f.startswith(".") for f in files)
    assert app.state.render_cache.rendered == len(files)  # each rendered once, not once per request
