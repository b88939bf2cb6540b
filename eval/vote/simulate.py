"""Scripted voters through the real HTTP API: used by the concurrency test, the load
benchmark and the demo's *simulated* vote (its votes say nothing about the models)."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class VoterRun:
    """What one scripted voter saw."""

    status: Counter = field(default_factory=Counter)  # HTTP status of each vote submission
    accepted: int = 0
    duplicates_tried: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per vote submission
    errors: list[str] = field(default_factory=list)


def run_voter(
    base_url: str,
    token: str,
    choose: Callable[[dict, str], str] | None = None,
    max_answers: int = 10**6,
    retry_duplicate: bool = False,
    seed: int = 0,
    timeout: float = 60.0,
) -> VoterRun:
    """Answer until the server says done (or ``max_answers``), fetching both images of
    each pair first. ``choose(task, question)`` returns "A", "B" or "tie" (default:
    random). ``retry_duplicate`` re-sends each first answer once, which the server must
    refuse with 409."""
    import httpx

    rng = random.Random(seed)
    choose = choose or (lambda task, q: rng.choice(["A", "B", "tie"]))
    run = VoterRun()
    with httpx.Client(base_url=base_url, headers={"X-Token": token}, timeout=timeout) as client:
        while run.accepted < max_answers:
            r = client.get("/api/next")
            if r.status_code != 200:
                run.errors.append(f"next: HTTP {r.status_code}")
                break
            task = r.json()
            if task["done"]:
                break
            for side in ("A", "B"):  # as a browser does: a vote counts only after both images were sent
                img = client.get(f"/image/{task['pair_id']}/{side}")
                if img.status_code != 200:
                    run.errors.append(f"image {side}: HTTP {img.status_code}")
            for q in task["questions"]:
                body = {"pair_id": task["pair_id"], "question": q["id"], "choice": choose(task, q["id"])}
                t0 = time.perf_counter()
                resp = client.post("/api/vote", json=body)
                run.latencies.append(time.perf_counter() - t0)
                run.status[resp.status_code] += 1
                if resp.status_code == 200:
                    run.accepted += 1
                    if retry_duplicate:
                        run.duplicates_tried += 1
                        again = client.post("/api/vote", json=body)
                        run.status[again.status_code] += 1
                elif resp.status_code != 409:
                    run.errors.append(f"vote: HTTP {resp.status_code} {resp.text[:200]}")
                if run.accepted >= max_answers:
                    break
    return run


def run_voters(base_url: str, tokens: list[str], workers: int | None = None, **kw) -> list[VoterRun]:
    """Every token as one concurrent voter (one thread each)."""
    with ThreadPoolExecutor(max_workers=workers or len(tokens)) as pool:
        futures = [pool.submit(run_voter, base_url, t, seed=i, **kw) for i, t in enumerate(tokens)]
        return [f.result() for f in futures]
