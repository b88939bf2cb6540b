"""The import side of `annotations pull` at the size of ParaImage-Small's sample, side by side.

A project of N tasks with two annotators each (Label Studio JSON and JSON-MIN exports, the
shapes Label Studio 1.23 writes), reconciled into a fresh annotations table: the first pull,
a pull with nothing changed, and a pull after 10% of the texts were edited and 2% deleted.
What the Label Studio server itself takes (the export request) is not in it: the real-server
loop is timed by tests/captioning/small/test_labelstudio_server.py (see BENCHMARKS.md).

    .venv/bin/python bench/annotations_pull.py [--tasks 600]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from captioning.small import annotations as an
from paradiffusion.schemas import CANDIDATES
from paradiffusion.storage import Table
from pipelines.config import load_config


def export(keys: list[str], stamp: str, edited: set[str], deleted: set[str]) -> list[dict]:
    tasks = []
    for i, k in enumerate(keys):
        anns = []
        for u in (1, 2):
            if (k, u) in deleted:
                continue
            text = f"annotator {u} describes {k}: " + "a red boat on calm water near a pier " * 6
            anns.append(
                {
                    "id": 2 * i + u,
                    "completed_by": u,
                    "was_cancelled": False,
                    "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": stamp if (k, u) in edited else "2026-01-01T00:00:00Z",
                    "result": [
                        {
                            "from_name": "caption",
                            "type": "textarea",
                            "value": {"text": [text + (" edited" if (k, u) in edited else "")]},
                        }
                    ],
                }
            )
        tasks.append({"id": i + 1, "data": {"key": k}, "annotations": anns})
    return tasks


def json_min(tasks: list[dict]) -> list[dict]:
    out = []
    for t in tasks:
        if not t["annotations"]:
            out.append({**t["data"], "id": t["id"], "annotator": None, "annotation_id": None})
        for a in t["annotations"]:
            out.append(
                {
                    **t["data"],
                    "id": t["id"],
                    "caption": a["result"][0]["value"]["text"][0],
                    "annotator": a["completed_by"],
                    "annotation_id": a["id"],
                    "created_at": a["created_at"],
                    "updated_at": a["updated_at"],
                }
            )
    return out


def run(n: int, shape: str, root: Path) -> dict[str, float]:
    keys = [f"k{i:05d}" for i in range(n)]
    cands = [{"key": k, "selection_rank": i, "url": "u"} for i, k in enumerate(keys)]
    Table(str(root / "candidates"), CANDIDATES).write_shard("00000", pa.Table.from_pylist(cands, schema=CANDIDATES))
    cfg = load_config([], [f"project.data_root={root}", f"select_small.output={root / 'candidates'}"])
    edited = {(k, 1) for k in keys[: n // 10]}
    deleted = {(k, 2) for k in keys[n // 10 : n // 10 + n // 50]}
    steps = {
        "first pull": export(keys, "2026-01-01T00:00:00Z", set(), set()),
        "unchanged pull": export(keys, "2026-01-01T00:00:00Z", set(), set()),
        "10% edited, 2% deleted": export(keys, "2026-01-02T00:00:00Z", edited, deleted),
    }
    out = {}
    for i, (label, doc) in enumerate(steps.items()):
        f = root / f"pull-{i}.json"
        f.write_text(json.dumps(doc if shape == "JSON" else json_min(doc)))
        t0 = time.perf_counter()
        res = an.import_file(cfg, str(f), reconcile=True)
        out[label] = time.perf_counter() - t0
        out[label + " (versions)"] = res.summary.n_out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=600)
    args = ap.parse_args()
    results = {}
    for shape in ("JSON", "JSON_MIN"):
        with tempfile.TemporaryDirectory() as d:
            results[shape] = run(args.tasks, shape, Path(d))
    print(f"\n{args.tasks} tasks x 2 annotators, reconciling pull (import side only)")
    print(f"{'step':<26}{'JSON s':>9}{'JSON_MIN s':>12}{'versions':>10}{'MIN/JSON':>10}")
    for label in ("first pull", "unchanged pull", "10% edited, 2% deleted"):
        j, m = results["JSON"][label], results["JSON_MIN"][label]
        v = results["JSON"][label + " (versions)"]
        print(f"{label:<26}{j:>9.2f}{m:>12.2f}{v:>10}{m / j:>10.2f}")


if __name__ == "__main__":
    main()
