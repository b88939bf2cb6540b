"""eval-generate -> eval (metrics) -> vote -> eval-report through the real CLI, with tiny
offline models: an untrained tiny ParaDiffusion export (kind paradiffusion), a tiny diffusers
StableDiffusionPipeline (kind diffusers) and a tiny open_clip."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from eval_prompt_files import SAMPLE_PROMPTS, trimmed_dpg_questions
from PIL import Image

from eval.testing import build_tiny_paradiffusion, build_tiny_pickscore, build_tiny_sd
from paradiffusion.storage import Table
from paradiffusion.testing.tiny_clip import TINY_MODEL_CFG, build_tiny_clip
from pipelines.cli import main
from pipelines.config import load_config

LONG_CFG = {**TINY_MODEL_CFG, "text_cfg": {**TINY_MODEL_CFG["text_cfg"], "context_length": 248}}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_vlm):
    root = tmp_path_factory.mktemp("models")
    return {
        "vlm": tiny_vlm,
        "dpg_questions": str(trimmed_dpg_questions(root)),
        "a": build_tiny_paradiffusion(root / "pd", seed=0),
        "b": build_tiny_sd(root / "sd-b", seed=1),
        "clip": build_tiny_clip(root / "clip"),
        "pickscore": build_tiny_pickscore(root / "pickscore"),
        # a Long-CLIP stand-in: the tiny CLIP with a 248-token text context
        "long_clip": build_tiny_clip(root / "long_clip", model_cfg=LONG_CFG),
    }


def _config(tmp_path: Path, models: dict, fid_ref: Path | None = None) -> Path:
    model = {"kind": "diffusers", "height": 32, "width": 32, "steps": 1, "dtype": "fp32", "batch_size": 2}
    doc = {
        "project": {"data_root": str(tmp_path / "data")},
        "caption": {  # the DPG-Bench judge: any VLM the captioner registry loads (here the tiny LLaVA)
            "captioner": "tiny",
            "captioners": {
                "tiny": {"type": "transformers", "model": models["vlm"], "dtype": "float32", "device": "cpu"}
            },
        },
        "eval": {
            "prompt_sets": {
                "para": {"kind": "paraprompts", "path": str(SAMPLE_PROMPTS / "paraprompts_sample.csv"), "limit": 2},
                "vilg": {"kind": "vilg300", "path": str(SAMPLE_PROMPTS / "vilg_sample.csv"), "limit": 1},
                "dpg": {"kind": "dpg_bench", "path": str(SAMPLE_PROMPTS / "dpg" / "prompts"), "limit": 1},
            },
            "models": {
                "tiny-a": {**model, "kind": "paradiffusion", "path": models["a"]},
                "tiny-b": {**model, "path": models["b"]},
            },
            "generate": {"images_per_prompt": 2, "prompts_per_shard": 2, "device": "cpu"},
            "metrics": {
                "clip_model": models["clip"]["clip_model"],
                "aesthetic": models["clip"]["aesthetic"],
                "device": "cpu",
                "bootstrap": 200,
                "batch_size": 4,
                "fid_reference": str(fid_ref) if fid_ref else None,
                "preference": {"pickscore": models["pickscore"]},
                "long_clip_model": models["long_clip"]["clip_model"],
                "dpg": {"questions": models["dpg_questions"], "judge": "tiny", "max_new_tokens": 3},
            },
            "vote": {"pairs_per_voter": 3},
            "report": {"bootstrap": 200},
        },
    }
    f = tmp_path / "eval.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def test_generate_metrics_vote_report(tmp_path, models, capsys):
    cfg_file = _config(tmp_path, models)
    assert main(["eval-generate", "--config", str(cfg_file)]) == 0
    images = Table(str(tmp_path / "data" / "eval" / "images"))
    # 2 models x (para: 2 prompts -> 1 shard, vilg: 1 prompt -> 1 shard, dpg: 1 prompt -> 1 shard)
    assert len(images.done_shards()) == 6
    rows = images.read().to_pylist()
    assert len(rows) == 2 * (2 + 1 + 1) * 2 and not any(r["error"] for r in rows)
    r0 = rows[0]
    png = Image.open(images.path + "/" + r0["image_path"])
    assert png.size == (32, 32)
    assert png.text["model"] == r0["model"] and png.text["seed"] == str(r0["seed"])
    assert json.loads(png.text["settings"])["steps"] == 1 and png.text["prompt_id"] == r0["prompt_id"]
    assert {r["seed"] for r in rows} == {0, 1}
    assert (Path(images.path) / "_config.yaml").is_file()
    # same seed, same model: the same image on a rerun; a removed shard is redone, nothing else
    marker = sorted(Path(images.path, "_done").iterdir())[0]
    shard = marker.stem
    before = pq.read_table(images.shard_file(shard)).to_pylist()
    marker.unlink()
    capsys.readouterr()
    assert main(["eval-generate", "--config", str(cfg_file)]) == 0
    summary = json.loads(Path(images.path, "_summary.json").read_text())
    assert summary["skipped_already_done"] == 5 and summary["out"] == len(before)
    after = pq.read_table(images.shard_file(shard)).to_pylist()
    assert [r["key"] for r in after] == [r["key"] for r in before]
    for b, a in zip(before, after, strict=True):
        diff = abs(
            int(Image.open(images.path + "/" + a["image_path"]).getpixel((5, 5))[0])
            - int(Image.open(images.path + "/" + b["image_path"]).getpixel((5, 5))[0])
        )
        assert diff <= 2

    # FID reference = tiny-a's own images: its FID against them is ~0, tiny-b's is not
    ref = tmp_path / "ref"
    ref.mkdir()
    for r in rows:
        if r["model"] == "tiny-a" and r["prompt_set"] == "para":
            shutil.copy(images.path + "/" + r["image_path"], ref / Path(r["image_path"]).name)
    (ref / "broken.png").write_bytes(b"not an image")
    cfg_file = _config(tmp_path, models, fid_ref=ref)
    assert main(["eval", "--config", str(cfg_file)]) == 0
    metrics = Table(str(tmp_path / "data" / "eval" / "metrics"))
    mrows = metrics.read().to_pylist()
    assert len(mrows) == len(rows)
    assert all(m["clip_chunks"] > 1 for m in mrows if m["prompt_set"] == "para")  # long prompts were chunked
    assert all(m["aesthetic"] is not None and m["clip_score"] is not None for m in mrows)
    # DPG-Bench: the tiny VLM judged both images of the DPG prompt for each model (3 questions each)
    dpg_rows = [m for m in mrows if m["prompt_set"] == "dpg"]
    assert len(dpg_rows) == 4 and all(
        m["dpg_score"] is not None and m["dpg_score_corrected"] is not None for m in dpg_rows
    )
    assert all(m["dpg_score"] is None for m in mrows if m["prompt_set"] != "dpg")
    answers = Table(str(tmp_path / "data" / "eval" / "metrics" / "dpg_answers")).read().to_pylist()
    assert len(answers) == 4 * 3 and {a["crop"] for a in answers} == {0, 1}
    dpg_doc = metrics.load_json("_dpg.json")
    assert sorted(dpg_doc["results"]) == ["tiny-a/dpg", "tiny-b/dpg"] and "mPLUG" in dpg_doc["official_judge"]
    assert all(metrics.marker(s).get("dpg") == "complete" for s in metrics.done_shards() if "dpg" in s)
    assert all(isinstance(m["long_clip_score"], float) for m in mrows)
    agg = metrics.load_json("_aggregate.json")
    all_para_a = next(
        r for r in agg["rows"] if r["model"] == "tiny-a" and r["prompt_set"] == "para" and r["category"] == "ALL"
    )
    cs = all_para_a["clip_score"]
    assert cs["ci_low"] <= cs["mean"] <= cs["ci_high"] and all_para_a["n_images"] == 4
    assert "pickscore" not in agg["preference_notes"] and "not configured" in agg["preference_notes"]["hpsv2"]
    assert all(isinstance(m["pickscore"], float) for m in mrows) and "pickscore" in all_para_a
    fid = metrics.load_json("_fid.json")["results"]
    assert fid["tiny-a/para"]["fid"] == pytest.approx(0.0, abs=1e-3)
    assert fid["tiny-b/para"]["fid"] > 1e-3
    assert json.loads(Path(metrics.path, "_summary.json").read_text())["rejected"] == {"fid_reference_unreadable": 1}

    # votes through the real server, then the report
    from eval.vote.admin import open_store, sync_pairs
    from eval.vote.app import create_app
    from eval.vote.server import serve_in_thread
    from eval.vote.simulate import run_voters

    cfg = load_config([cfg_file])
    store = open_store(cfg)
    assert sync_pairs(cfg, store).n_out == 4  # one pair per prompt (seeds_per_prompt=1), one comparison
    store.set_meta("simulated", "scripted voters in a test.")
    tokens = [store.add_voter(f"v{i}") for i in range(3)]
    with serve_in_thread(create_app(store, store.get_meta("image_root"))) as url:
        runs = run_voters(url, tokens, choose=lambda task, q: "A")
    assert sum(r.accepted for r in runs) == 3 * 3 * 2
    assert main(["vote-admin", "export", "--config", str(cfg_file)]) == 0
    assert main(["eval-report", "--config", str(cfg_file)]) == 0
    page = (tmp_path / "data" / "eval" / "report" / "index.html").read_text()
    assert "Simulated votes" in page and "tiny-a vs tiny-b" in page and "visual_appeal" in page
    assert 'name=viewport content="width=device-width' in page and "Counted 18 of 18 votes, from 3 voters" in page
    assert "DPG-Bench (judge:" in page and " n=2</span>" in page  # the prompt count beside an interval
    assert "&#9888; 1 prompt<" in page  # rows on a single prompt are flagged
    srcs = re.findall(r'<img loading=lazy src="([^"]+)"', page)
    assert len(srcs) == len(rows) and all((tmp_path / "data" / "eval" / "report" / s).resolve().is_file() for s in srcs)
