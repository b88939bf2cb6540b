"""The filter stage end to end on img2dataset-like shards of the bundled sample."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.filter import run_filter
from paradiffusion.config import ConfigError
from paradiffusion.images import iter_kept_images, kept_keys
from paradiffusion.storage import Table
from paradiffusion.testing.image_shards import write_image_shards
from paradiffusion.testing.sample import build_sample
from paradiffusion.testing.tiny_clip import build_tiny_clip
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[2]
N_FAILED = 1  # failed downloads per shard
SHARD_SIZE = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("filter")
    records = build_sample(base / "sample")
    tiny = build_tiny_clip(base / "models")
    write_image_shards(records, base / "sample", base / "data" / "images", shard_size=SHARD_SIZE, n_failed=N_FAILED)
    n_shards = -(-len(records) // SHARD_SIZE)
    return {
        "base": base,
        "records": records,
        "tiny": tiny,
        "n_in": len(records) + N_FAILED * n_shards,
        "n_shards": n_shards,
    }


def _sets(root: Path, tiny: dict, *extra: str) -> list[str]:
    return [
        f"project.data_root={root}",
        "filter.runner=local",
        f"filter.models.clip_model={tiny['clip_model']}",
        f"filter.models.aesthetic={tiny['aesthetic']}",
        "filter.thresholds.min_short_side=128",
        "filter.thresholds.aesthetic_min=null",
        "filter.thresholds.clip_score_min=null",
        "filter.decode.reduced_jpeg=false",
        "filter.decode_batch_size=8",
        *extra,
    ]


def _run(root: Path, tiny: dict, *extra: str) -> dict:
    assert run_filter(load_config([], _sets(root, tiny, *extra))) == 0
    return Table(str(root / "scores")).load_json("_summary.json")


def _copy_images(world, name: str) -> Path:
    root = world["base"] / name
    shutil.copytree(world["base"] / "data" / "images", root / "images")
    return root


def test_every_input_has_one_row_with_the_expected_reason(world):
    root = _copy_images(world, "run_reasons")
    summary = _run(root, world["tiny"])
    scores = Table(str(root / "scores")).read().to_pylist()
    n_in = world["n_in"]
    assert len(scores) == n_in == summary["in"]
    assert len({r["key"] for r in scores}) == n_in
    by_name = {r["url"].rsplit("/", 1)[-1]: r for r in scores if "/images/" in r["url"]}
    failed = [r for r in scores if "/missing/" in r["url"]]
    assert len(failed) == n_in - len(world["records"]) and all(
        r["reject_reason"] == "download_failed" and not r["kept"] for r in failed
    )
    for rec in world["records"]:
        row = by_name[rec.name]
        want = None if rec.expect == "ok" else rec.expect
        assert row["reject_reason"] == want, (rec.name, row["reject_reason"], row["reject_detail"])
        assert row["kept"] == (want is None)
    assert by_name["chelsea_copy.jpg"]["duplicate_of"] == by_name["chelsea.jpg"]["key"]
    assert by_name["coffee_same_pixels.png"]["duplicate_of"] == by_name["coffee.jpg"]["key"]
    assert by_name["exif_rotated.jpg"]["width"] == 300 and by_name["exif_rotated.jpg"]["height"] == 400
    kept = [r for r in scores if r["kept"]]
    assert all(r["clip_score"] is not None and r["aesthetic"] is not None for r in kept)
    # the funnel adds up and the run metadata is saved beside the table
    assert summary["out"] == len(kept) and summary["in"] == summary["out"] + summary["rejected_total"]
    assert Counter(r["reject_reason"] for r in scores if r["reject_reason"]) == Counter(summary["rejected"])
    assert (root / "scores" / "_config.yaml").is_file()
    # later stages read the kept set through paradiffusion.images
    assert sorted(kept_keys(str(root / "scores"))["key"].to_pylist()) == sorted(r["key"] for r in kept)
    n = sum(t.num_rows for _, t in iter_kept_images(str(root / "images"), str(root / "scores")))
    assert n == len(kept)


def test_thresholds_set_from_the_computed_scores(world):
    root = _copy_images(world, "run_thresholds")
    _run(root, world["tiny"])
    first = {r["key"]: r for r in Table(str(root / "scores")).read().to_pylist()}
    kept = [r for r in first.values() if r["kept"]]
    a_min = float(np.median([r["aesthetic"] for r in kept]))
    c_min = float(np.median([r["clip_score"] for r in kept]))
    shutil.rmtree(root / "scores")
    summary = _run(
        root, world["tiny"], f"filter.thresholds.aesthetic_min={a_min!r}", f"filter.thresholds.clip_score_min={c_min!r}"
    )
    second = {r["key"]: r for r in Table(str(root / "scores")).read().to_pylist()}
    for key, before in first.items():
        after = second[key]
        if before["reject_reason"] not in (None, "duplicate"):  # rejected before any score
            assert after["reject_reason"] == before["reject_reason"]
        elif before["aesthetic"] < a_min:
            assert after["reject_reason"] == "low_aesthetic", after
        elif before["clip_score"] < c_min:
            assert after["reject_reason"] == "low_clip_score", after
        else:  # passes both; a duplicate stays one only if its original passes too
            assert after["reject_reason"] in (None, "duplicate"), after
    assert summary["rejected"].get("low_aesthetic", 0) >= 1 and summary["rejected"].get("low_clip_score", 0) >= 1
    assert 0 < summary["out"] < len(kept)


def test_rerun_skips_finished_shards_and_new_shards_are_deduplicated_globally(world):
    root = _copy_images(world, "run_incremental")
    images = root / "images"
    # hold back the last shard (it holds chelsea_copy / coffee_same_pixels) as if still downloading
    held = world["base"] / "held"
    held.mkdir()
    for f in images.glob("00002*"):
        shutil.move(str(f), held / f.name)
    others = [f"{i:05d}" for i in range(world["n_shards"]) if i != 2]
    first = _run(root, world["tiny"])
    assert first["shards_measured_this_run"] == len(others) and first["rejected"].get("duplicate", 0) == 0
    again = _run(root, world["tiny"])
    assert again["shards_measured_this_run"] == 0 and again["shards_written_this_run"] == 0
    assert again["skipped_already_done"] == len(others)
    markers = {s: Table(str(root / "scores" / "_measure")).marker(s) for s in others}
    for f in held.iterdir():
        shutil.move(str(f), images / f.name)
    third = _run(root, world["tiny"])
    assert third["shards_measured_this_run"] == 1 and third["rejected"]["duplicate"] == 2
    work = Table(str(root / "scores" / "_measure"))
    assert {s: work.marker(s) for s in markers} == markers  # finished shards not redone
    assert third["in"] == world["n_in"]


def test_save_embeddings_and_near_duplicates(world):
    root = _copy_images(world, "run_near")
    summary = _run(
        root,
        world["tiny"],
        "filter.save_embeddings=true",
        "filter.thresholds.dedup=near",
        "filter.thresholds.near_dup_min=0.9999",
    )
    t = Table(str(root / "scores")).read()
    rows = t.to_pylist()
    kept = [r for r in rows if r["kept"]]
    assert all(len(r["image_embedding"]) == world["tiny"]["embed_dim"] for r in kept)
    assert all(r["text_embedding"] is not None for r in kept)
    assert summary["rejected"]["duplicate"] == 2  # exact ones are still exact duplicates
    for r in rows:
        if r["reject_reason"] == "near_duplicate":
            assert r["duplicate_of"] in {k["key"] for k in kept}


def test_config_errors_name_the_key(world, tmp_path):
    tiny = world["tiny"]
    with pytest.raises(ConfigError, match=r"filter\.thresholds\.max_aspect_ratio.*>= 1"):
        load_config([], ["filter.thresholds.max_aspect_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"filter\.decode\.animated.*'reject', 'first_frame'"):
        load_config([], ["filter.decode.animated=sometimes"])
    with pytest.raises(ConfigError, match=r"filter\.thresholds\.clip_score_min = 7.*<= 1.0.*a cosine"):
        load_config([], ["filter.thresholds.clip_score_min=7"])
    with pytest.raises(ConfigError, match=r"filter\.thresholds\.aesthetic_min = 11.*<= 10.0"):
        load_config([], ["filter.thresholds.aesthetic_min=11"])
    with pytest.raises(ConfigError, match=r"filter\.changed_settings.*'refuse', 'remeasure'"):
        load_config([], ["filter.changed_settings=sometimes"])
    with pytest.raises(ConfigError, match=r"filter\.thresholds.*unknown key.*aesthetic_min"):
        load_config([], ["filter.thresholds.aesthetic_minimum=5"])
    with pytest.raises(ConfigError, match=r"filter\.models\.clip_model = 'ViT-Nope'"):
        run_filter(load_config([], _sets(tmp_path, tiny, "filter.models.clip_model=ViT-Nope")))
    with pytest.raises(ConfigError, match=r"clip_pretrained = 'nope': .*allowed: openai"):
        run_filter(
            load_config(
                [], _sets(tmp_path, tiny, "filter.models.clip_model=ViT-L-14", "filter.models.clip_pretrained=nope")
            )
        )
    with pytest.raises(ConfigError, match=r"filter\.input = .*no complete img2dataset shards"):
        run_filter(load_config([], _sets(tmp_path, tiny)))
    with pytest.raises(ConfigError, match=r"aesthetic_min = 5.0 needs filter\.models\.aesthetic"):
        run_filter(
            load_config([], _sets(tmp_path, tiny, "filter.models.aesthetic=null", "filter.thresholds.aesthetic_min=5"))
        )
    with pytest.raises(ConfigError, match=r"filter\.models\.aesthetic = .*file not found"):
        run_filter(load_config([], _sets(tmp_path, tiny, f"filter.models.aesthetic={tmp_path}/none.pth")))


def _kill_and_resume(
    world, name: str, runner_sets: list[str], n_copies: int, timeout: float, root_url: str | None = None
) -> None:
    """Start the CLI, SIGKILL it once some (not all) shards are measured, rerun, check the table.
    ``root_url``: the data root on object storage (the shards are uploaded there first)."""
    from paradiffusion import storage as storage_module
    from paradiffusion.storage import upload_folder
    from paradiffusion.testing.sample import load_records

    local = world["base"] / name
    records = load_records(world["base"] / "sample") * n_copies
    names = write_image_shards(records, world["base"] / "sample", local / "images", shard_size=12)
    root = f"{root_url}/{name}" if root_url else str(local)
    if root_url:
        upload_folder(local / "images", f"{root}/images")
    cmd = [sys.executable, "-m", "paradiffusion", "filter", "--config", os.devnull]
    for s in _sets(root, world["tiny"], *runner_sets):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work = Table(f"{root}/scores/_measure")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + timeout
    try:
        while len(work.done_shards()) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and every process it started
    finally:
        proc.wait()
    done_before = {s: work.marker(s) for s in work.done_shards()}
    assert 2 <= len(done_before) < len(names)
    # a rerun keeps what was written within the storage clock slack before its start (another rank's
    # write in progress, or a store's clock a little ahead); a user's rerun comes later than that
    time.sleep(storage_module._CLOCK_SLACK_S + 1)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = Table(f"{root}/scores")
    summary = out.load_json("_summary.json")
    assert summary["shards_measured_this_run"] == len(names) - len(done_before)
    assert {s: work.marker(s) for s in done_before} == done_before  # not redone
    scores = out.read(columns=["key", "shard"])
    keys = scores["key"].to_pylist()
    total = sum(pq.ParquetFile(local / "images" / f"{n}.parquet").metadata.num_rows for n in names)
    assert len(keys) == len(set(keys)) == total  # nothing lost, nothing duplicated
    assert sorted(set(scores["shard"].to_pylist())) == names
    for t in (out, work):  # the killed run's in-flight writes were cleaned up by the rerun
        assert not t.fs.exists(t._p(".tmp")) or t.fs.ls(t._p(".tmp")) == []
    dups = summary["rejected"]["duplicate"]
    base = load_records(world["base"] / "sample")
    n_ok = sum(r.expect == "ok" for r in base)
    n_candidates = n_ok + sum(r.expect == "duplicate" for r in base)
    assert dups == n_candidates * n_copies - n_ok  # every copy of a kept image is a duplicate of one original


def test_kill_and_resume_loses_and_duplicates_nothing(world):
    _kill_and_resume(world, "run_kill_local", [], n_copies=4, timeout=240)


@pytest.mark.slow
def test_kill_and_resume_on_ray(world):
    _kill_and_resume(
        world, "run_kill_ray", ["filter.runner=ray", "ray.address=local", "ray.num_cpus=2"], n_copies=6, timeout=300
    )


@pytest.mark.slow
def test_kill_and_resume_on_ray_with_the_data_root_on_s3(world, s3_root):
    """The same on S3 (moto's server): no atomic rename there, only the markers say what is done;
    Ray's readers get the endpoint and credentials from the driver."""
    _kill_and_resume(
        world,
        "run_kill_s3",
        ["filter.runner=ray", "ray.address=local", "ray.num_cpus=2"],
        n_copies=6,
        timeout=300,
        root_url=s3_root,
    )


@pytest.mark.slow
def test_ray_runner_gives_the_same_table_as_the_plain_loop(world):
    a, b = _copy_images(world, "run_loop"), _copy_images(world, "run_ray")
    _run(a, world["tiny"])
    summary = _run(
        b,
        world["tiny"],
        "filter.runner=ray",
        "ray.address=local",
        "ray.num_cpus=2",
        "filter.num_actors=1",
        "filter.batch_size=8",
    )
    assert "Ray" in summary["ran_on"]
    cols = ["key", "kept", "reject_reason", "width", "height", "duplicate_of", "pixel_hash"]
    ta = Table(str(a / "scores")).read(columns=cols).sort_by("key").to_pylist()
    tb = Table(str(b / "scores")).read(columns=cols).sort_by("key").to_pylist()
    assert ta == tb
    sa = Table(str(a / "scores")).read(columns=["key", "clip_score"]).sort_by("key")["clip_score"].to_numpy()
    sb = Table(str(b / "scores")).read(columns=["key", "clip_score"]).sort_by("key")["clip_score"].to_numpy()
    assert np.allclose(np.nan_to_num(sa), np.nan_to_num(sb), atol=1e-4)


def test_batch_to_table_reads_all_none_columns_that_ray_turned_into_nan():
    from curation.filter import batch_to_table

    n = 2
    nan = np.full(n, np.nan, np.float32)  # what Ray Data makes of an object column of None
    batch = {
        "key": np.array(["a", "b"], dtype=object),
        "shard": np.array(["s", "s"], dtype=object),
        "url": nan,
        "caption": np.array(["x", None], dtype=object),
        "sha256": nan,
        "pixel_hash": nan,
        "language": nan,
        "reject_reason": nan,
        "reject_detail": nan,
        "width": np.array([10, -1], np.int32),
        "height": np.array([20, -1], np.int32),
        "language_score": nan,
        "aesthetic": np.array([1.5, np.nan], np.float32),
        "clip_score": nan,
    }
    rows = batch_to_table(batch).to_pylist()
    assert [r["reject_reason"] for r in rows] == [None, None] and all(r["kept"] for r in rows)
    assert rows[0]["width"] == 10 and rows[1]["width"] is None and rows[1]["aesthetic"] is None
    assert rows[0]["url"] is None and rows[1]["caption"] is None


def _final_fingerprints(root: Path) -> set:
    out = Table(str(root / "scores"))
    return {m.get("config_fingerprint") for m in out.markers().values()}


def test_changed_thresholds_are_redecided_and_provenance_stays_true(world):
    import yaml

    root = _copy_images(world, "run_provenance")
    first = _run(root, world["tiny"])
    scores = {r["key"]: r for r in Table(str(root / "scores")).read().to_pylist()}
    kept = [r for r in scores.values() if r["kept"]]
    c_min = float(np.median([r["clip_score"] for r in kept]))
    work = Table(str(root / "scores" / "_measure"))
    measured = {s: work.marker(s) for s in work.done_shards()}

    # A model-score threshold: decided again from the stored scores, nothing measured again.
    second = _run(root, world["tiny"], f"filter.thresholds.clip_score_min={c_min!r}")
    assert second["shards_measured_this_run"] == 0 and second["shards_redecided_this_run"] == world["n_shards"]
    assert {s: work.marker(s) for s in work.done_shards()} == measured
    assert second["rejected"]["low_clip_score"] >= 1 and second["out"] < first["out"]
    # A stricter size check: re-decided from the stored sizes (no model work), every final shard rewritten.
    third = _run(
        root, world["tiny"], f"filter.thresholds.clip_score_min={c_min!r}", "filter.thresholds.min_short_side=400"
    )
    assert third["shards_measured_this_run"] == 0 and third["shards_redecided_this_run"] == world["n_shards"]
    fresh_root = _copy_images(world, "run_provenance_fresh")
    fresh = _run(
        fresh_root, world["tiny"], f"filter.thresholds.clip_score_min={c_min!r}", "filter.thresholds.min_short_side=400"
    )
    cols = ["key", "kept", "reject_reason", "duplicate_of"]
    a = Table(str(root / "scores")).read(columns=cols).sort_by("key").to_pylist()
    b = Table(str(fresh_root / "scores")).read(columns=cols).sort_by("key").to_pylist()
    assert a == b and third["rejected"] == fresh["rejected"]  # the same as measuring from scratch
    doc = yaml.safe_load((root / "scores" / "_config.yaml").read_text())
    assert doc["config"]["filter"]["thresholds"]["min_short_side"] == 400
    assert doc.get("shards_with_other_settings") is None
    assert _final_fingerprints(root) == {doc["stage_fingerprint"]}  # every shard made by what it names
    marker = Table(str(root / "scores")).marker("00000")
    assert marker["settings"]["checks"]["min_short_side"] == 400

    # Checks looser than the ones the shards were measured with need scores the rows rejected
    # then never got: refused, and nothing changes. So are other models or decode settings.
    before = (root / "scores" / "_config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"min_short_side 128 -> 64.*never scored.*changed_settings=remeasure"):
        run_filter(load_config([], _sets(root, world["tiny"], "filter.thresholds.min_short_side=64")))
    with pytest.raises(ConfigError, match=r"filter\.decode\.max_pixels 100000000 -> 1000000"):
        run_filter(load_config([], _sets(root, world["tiny"], "filter.decode.max_pixels=1000000")))
    assert (root / "scores" / "_config.yaml").read_text() == before
    # ...unless asked to measure them again.
    again = _run(root, world["tiny"], "filter.thresholds.min_short_side=64", "filter.changed_settings=remeasure")
    # only the shards holding rows that were rejected as too small before scoring are measured again
    assert 1 <= again["shards_measured_this_run"] < world["n_shards"] and again["in"] == world["n_in"]
    assert again["shards_measured_this_run"] + again["shards_redecided_this_run"] == world["n_shards"]
    assert again["rejected"].get("too_small", 0) == 0  # the 96 px images now pass
    doc = yaml.safe_load((root / "scores" / "_config.yaml").read_text())
    assert _final_fingerprints(root) == {doc["stage_fingerprint"]}
    final = Table(str(root / "scores")).markers().values()
    assert {m["settings"]["checks"]["min_short_side"] for m in final} == {64}


def test_near_duplicates_exact_and_approximate_search_agree(world):
    root = _copy_images(world, "run_near_ann")
    sets = ["filter.save_embeddings=true", "filter.thresholds.dedup=near", "filter.thresholds.near_dup_min=0.999"]
    _run(root, world["tiny"], *sets, "filter.near_dup.search=exact")
    exact = Table(str(root / "scores")).read(columns=["key", "reject_reason", "duplicate_of"]).sort_by("key")
    summary = _run(root, world["tiny"], *sets, "filter.near_dup.search=ann", "filter.near_dup.nlist=2")
    assert summary["shards_measured_this_run"] == 0 and "k-means cells" in summary["near_dup_search"]
    ann = Table(str(root / "scores")).read(columns=["key", "reject_reason", "duplicate_of"]).sort_by("key")
    assert ann.to_pylist() == exact.to_pylist()
