"""`paradiffusion caption` end to end on fixture images with tiny local models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from caption_fixtures import caption_config, write_dataset

from captioning.pipeline import run_caption
from captioning.store import select_captions
from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table

REPO = Path(__file__).resolve().parents[2]


def captions(root: str):
    return Table(f"{root}/captions", CAPTIONS).read()


def assert_one_row_per_key(t, keys):
    got = t["key"].to_pylist()
    assert sorted(got) == sorted(keys), "every kept key exactly once"


def test_local_run_writes_every_kept_key_once_and_resumes(dataset, tiny_vlm):
    root = dataset["root"]
    cfg = caption_config(root, tiny_vlm)
    s = run_caption(cfg)
    kept = [*dataset["expected"], dataset["broken"]]
    t = captions(root)
    assert_one_row_per_key(t, kept)
    assert dataset["dropped"] not in t["key"].to_pylist()
    rows = {r["key"]: r for r in t.to_pylist()}
    bad = rows[dataset["broken"]]
    assert bad["finish_reason"] == "error" and bad["caption"] is None and "decode_error" in bad["error"]
    assert bad["flags"] == ["error"]
    good = rows[next(iter(dataset["expected"]))]
    assert good["model_id"] == tiny_vlm and good["prompt_id"] == "paper" and len(good["prompt_hash"]) == 16
    assert json.loads(good["generation"])["max_new_tokens"] == 12
    assert good["n_words"] == len(good["caption"].split()) and 0 < good["n_tokens"] <= 12
    assert s.n_out == len(dataset["expected"]) and s.rejected == {"decode_error": 1}
    assert s.flagged["too_short"] == s.n_out  # 12 tokens are never 50 words
    saved = json.loads(Path(root, "captions", "_summary.json").read_text())
    assert saved["captioned"] == s.n_out and saved["flagged"]["too_short"] == s.n_out
    assert (
        yaml.safe_load(Path(root, "captions", "_config.yaml").read_text())["config"]["caption"]["captioner"] == "tiny"
    )

    again = run_caption(cfg)  # nothing to redo but the error row, which is retried (and still fails)
    assert again.n_out == 0 and again.skipped_done == len(dataset["expected"])
    t2 = captions(root)
    assert_one_row_per_key(t2, kept)
    assert {r["key"]: r["created_at"] for r in t2.to_pylist() if r["finish_reason"] != "error"} == {
        k: r["created_at"] for k, r in rows.items() if r["finish_reason"] != "error"
    }


def test_recaption_replaces_and_prompts_coexist(dataset, tiny_vlm):
    root = dataset["root"]
    run_caption(caption_config(root, tiny_vlm, "caption.resources.executor=local"), limit=4)
    assert captions(root).num_rows == 4
    first = {r["key"]: r["created_at"] for r in captions(root).to_pylist()}
    run_caption(caption_config(root, tiny_vlm), recaption=True)
    t = captions(root)
    kept = [*dataset["expected"], dataset["broken"]]
    assert_one_row_per_key(t, kept)
    assert all(r["created_at"] > first[r["key"]] for r in t.to_pylist() if r["key"] in first)
    short = caption_config(root, tiny_vlm, "caption.prompt=short", "caption.prompts.short=Describe the image briefly.")
    run_caption(short)
    t = captions(root)
    assert t.num_rows == 2 * len(kept)
    assert sorted(set(t["prompt_id"].to_pylist())) == ["paper", "short"]
    sel = select_captions(t, short.caption.select)
    assert sorted(sel["key"].to_pylist()) == sorted(dataset["expected"])  # one per key, errors never selected
    assert set(sel["prompt_id"].to_pylist()) == {"paper"}  # the default rule prefers the paper's prompt


def test_native_cogvlm_through_the_ray_pipeline(dataset, tiny_cog):
    """The real (tiny) CogVLM on the Ray actor pool: each key gets the caption of its own image."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from captioning.captioners import load_captioner
    from captioning.config import CaptionerSpec, GenerationSettings

    spec = f"{{cog: {{type: cogvlm, model: '{tiny_cog}', dtype: float32, device: cpu}}}}"
    cfg = caption_config(
        dataset["root"], tiny_cog, "caption.captioner=cog", f"caption.captioners={spec}", executor="ray"
    )
    s = run_caption(cfg)
    got = {r["key"]: r for r in captions(dataset["root"]).to_pylist()}
    assert_one_row_per_key(captions(dataset["root"]), [*dataset["expected"], dataset["broken"]])
    assert s.n_out == len(dataset["expected"]) and s.rejected == {"decode_error": 1}
    # the same captioner, one image at a time, on the images decoded straight from the shards
    cap = load_captioner(
        CaptionerSpec(type="cogvlm", model=tiny_cog, dtype="float32", device="cpu"),
        GenerationSettings(max_new_tokens=12),
    )
    images = {}
    for shard in sorted(Path(dataset["root"], "images").glob("*.parquet")):
        for row in pq.read_table(shard, columns=["key", "jpg"]).to_pylist():
            images[row["key"]] = row["jpg"]
    for key in dataset["expected"]:
        alone = cap.caption([Image.open(io.BytesIO(images[key])).convert("RGB")], cfg.caption.prompt_text)[0]
        assert got[key]["caption"] == alone.caption, key
        assert got[key]["model_id"] == tiny_cog and got[key]["finish_reason"] == alone.finish_reason
    assert len({got[k]["caption"] for k in dataset["expected"]}) > 1
    again = run_caption(
        caption_config(dataset["root"], tiny_cog, "caption.captioner=cog", f"caption.captioners={spec}")
    )
    assert again.n_out == 0 and again.skipped_done == len(dataset["expected"])  # never redo


def test_broken_cogvlm_folder_stops_before_any_work(dataset, tiny_cog, tmp_path):
    import shutil

    from paradiffusion.config import ConfigError

    broken = tmp_path / "broken_cog"
    shutil.copytree(tiny_cog, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    spec = f"{{cog: {{type: cogvlm, model: '{broken}', dtype: float32, device: cpu}}}}"
    cfg = caption_config(dataset["root"], str(broken), "caption.captioner=cog", f"caption.captioners={spec}")
    with pytest.raises(ConfigError, match=rf"caption.captioners.cog.model: .*missing: {shard.name}"):
        run_caption(cfg)
    assert not Path(dataset["root"], "captions", "_done").exists()


def test_ray_end_to_end(dataset, tiny_vlm):
    """Ray Data: decode tasks + a model actor pool, on a local Ray."""
    cfg = caption_config(dataset["root"], tiny_vlm, executor="ray")
    s = run_caption(cfg)
    t = captions(dataset["root"])
    assert_one_row_per_key(t, [*dataset["expected"], dataset["broken"]])
    assert s.n_out == len(dataset["expected"]) and s.rejected == {"decode_error": 1}
    assert s.extra["shards_written"] == len(Table(f"{dataset['root']}/captions").done_shards())


def _kill_and_resume(
    tmp_path: Path, tiny_vlm: str, executor: str, n_shards: int = 2, per_shard: int = 9, root_url: str | None = None
) -> None:
    """``root_url``: the data root on object storage (the dataset is uploaded there first)."""
    info = write_dataset(tmp_path / "data", n_shards=n_shards, per_shard=per_shard, broken=False)
    if root_url:
        from paradiffusion.storage import upload_folder

        for name in ("images", "scores"):
            upload_folder(Path(info["root"], name), f"{root_url}/data/{name}")
        info["root"] = f"{root_url}/data"
    cfg_file = tmp_path / "caption.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "project": {"data_root": info["root"]},
                "ray": {"address": "local", "num_cpus": 2},
                "caption": {
                    "captioner": "tiny",
                    "captioners": {
                        "tiny": {"type": "transformers", "model": tiny_vlm, "dtype": "float32", "device": "cpu"}
                    },
                    "generation": {"max_new_tokens": 32, "min_new_tokens": 32},
                    "batch_size": 2,
                    "chunk_rows": 2,
                    "resources": {"executor": executor},
                },
            }
        )
    )
    cmd = [sys.executable, "-m", "paradiffusion", "caption", "--config", str(cfg_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = Table(f"{info['root']}/captions")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(out.done_shards()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make it slower"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {r["key"]: r["created_at"] for r in captions(info["root"]).to_pylist()}
    assert 0 < len(before) < len(info["expected"])
    # a rerun keeps what was written within the storage clock slack before its start (another rank's
    # write in progress); a user's rerun comes later than that
    from paradiffusion import storage as storage_module

    time.sleep(storage_module._CLOCK_SLACK_S + 1)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = captions(info["root"])
    assert_one_row_per_key(after, info["expected"])  # nothing lost, nothing duplicated
    kept_rows = {r["key"]: r["created_at"] for r in after.to_pylist() if r["key"] in before}
    assert kept_rows == before  # what was committed before the kill was not redone
    assert f"{len(before)} already captioned" in rerun.stderr
    assert not out.fs.exists(out._p(".tmp")) or out.fs.ls(out._p(".tmp")) == []


def test_kill_and_resume_local(tmp_path, tiny_vlm):
    _kill_and_resume(tmp_path, tiny_vlm, "local")


@pytest.mark.slow
def test_kill_and_resume_ray(tmp_path, tiny_vlm):
    # Ray hands finished blocks to the driver in bursts: give it enough rows that the
    # kill lands between bursts even on a fast, quiet machine.
    _kill_and_resume(tmp_path, tiny_vlm, "ray", n_shards=4, per_shard=16)


@pytest.mark.slow
def test_kill_and_resume_ray_with_the_data_root_on_s3(tmp_path, tiny_vlm, s3_root):
    """The same with every table on S3 (moto's server): only markers commit, Ray's decode tasks
    get the endpoint and credentials from the driver."""
    _kill_and_resume(tmp_path, tiny_vlm, "ray", n_shards=4, per_shard=16, root_url=s3_root)


def _caption_on_the_cluster(ray_cluster, root: str, tiny_vlm: str, env: dict) -> dict:
    """`paradiffusion caption` through the CLI on the cluster, in a process of its own; returns the summary."""
    sets = [
        f"project.data_root={root}",
        "caption.captioner=tiny",
        f"caption.captioners={{tiny: {{type: transformers, model: '{tiny_vlm}', dtype: float32, device: cpu}}}}",
        "caption.generation.max_new_tokens=8",
        "caption.chunk_rows=4",
        *ray_cluster.ray_overrides(),
    ]
    cmd = [sys.executable, "-m", "paradiffusion", "caption", "--config", os.devnull]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = Table(f"{root}/captions").load_json("_summary.json")
    assert f"Ray cluster at {ray_cluster.address} (2 node(s)" in summary["ran_on"]
    return summary


@pytest.mark.cluster
def test_caption_on_a_two_node_cluster(ray_cluster, tmp_path, tiny_vlm):
    """`paradiffusion caption` through the CLI on a cluster started with `ray start` (token auth)."""
    info = write_dataset(tmp_path / "data")
    summary = _caption_on_the_cluster(ray_cluster, str(info["root"]), tiny_vlm, ray_cluster.env)
    assert summary["captioned"] == len(info["expected"]) and summary["rejected"] == {"decode_error": 1}
    assert_one_row_per_key(captions(info["root"]), [*info["expected"], info["broken"]])


@pytest.mark.cluster
def test_caption_on_a_two_node_cluster_with_the_tables_on_s3(ray_cluster, tmp_path, tiny_vlm, s3_root):
    """The cluster's nodes were started without any AWS variable: its workers read the images from
    S3 with what the driver hands them (the job's setup hook)."""
    from paradiffusion.storage import upload_folder

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3"):
        assert k not in ray_cluster.env, k
    info = write_dataset(tmp_path / "data")
    for name in ("images", "scores"):
        upload_folder(Path(info["root"], name), f"{s3_root}/data/{name}")
    root = f"{s3_root}/data"
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the driver's, as a user sets them
    summary = _caption_on_the_cluster(ray_cluster, root, tiny_vlm, {**ray_cluster.env, **aws})
    assert summary["captioned"] == len(info["expected"]) and summary["rejected"] == {"decode_error": 1}
    assert_one_row_per_key(captions(root), [*info["expected"], info["broken"]])


def test_remote_cogvlm_refuses_to_run_unpinned(tmp_path):
    from pipelines.cli import main

    rc = main(
        [
            "caption",
            "--config",
            str(REPO / "pipelines.yaml"),
            "--set",
            f"project.data_root={tmp_path}",
            "--set",
            "caption.captioner=cogvlm_remote",
        ]
    )
    assert rc == 2  # a config error, before any model is loaded or any file written
    assert not (tmp_path / "captions").exists()
