"""`paradiffusion demo` with its data root on S3 (moto's server on 127.0.0.1): every stage runs,
its tables are committed on S3, a planted credential appears in no output, and no process of the
run tries to reach another machine (outbound connections refused and recorded: see
tests/pipelines/test_demo_offline.py, which checks the recorder itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from paradiffusion.offline import NO_PHONE_HOME
from paradiffusion.testing.netguard import RAY_CLOUD_PROBE, RecordingProxy, guarded_env, local_hosts, read_log

REPO = Path(__file__).resolve().parents[2]


def _files(*roots: Path):
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath, n)
                if p.is_file() and not p.is_symlink():
                    yield p


@pytest.mark.slow
def test_demo_on_s3_runs_every_stage_leaks_no_credential_and_calls_nobody(tmp_path, s3_server):
    s3fs = pytest.importorskip("s3fs")
    secret = f"PLANTED-SECRET-{uuid.uuid4().hex}"  # in the environment, as a user sets it
    token = f"PLANTED-TOKEN-{uuid.uuid4().hex}"  # in the config, through --set
    key = f"AKIAPLANTED{uuid.uuid4().hex[:8].upper()}"
    bucket = s3_server.make_bucket(f"demo-{uuid.uuid4().hex[:10]}")
    out = tmp_path / "demo"
    scratch = Path(tempfile.mkdtemp(prefix="pd-s3-", dir="/tmp"))  # TMPDIR of the run: stage logs, Ray's session
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_")) and k not in NO_PHONE_HOME}
    proxy = RecordingProxy().__enter__()
    env = guarded_env(tmp_path / "guard", proxy.url, base=env)
    env.update(
        PYTHONPATH=f"{tmp_path / 'guard'}{os.pathsep}{REPO}",
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        TMPDIR=str(scratch),
        RAY_TMPDIR=str(scratch),
    )
    cmd = [sys.executable, "-m", "paradiffusion", "demo", "--out", str(out), "--data-root", f"{bucket}/data"]
    cmd += ["--config", str(REPO / "pipelines.yaml"), "--set", f"storage.token={token}"]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-5000:]

        fs = s3fs.S3FileSystem(**s3_server.storage_options(key, secret), skip_instance_cache=True)
        data = f"{bucket.removeprefix('s3://')}/data"
        # download wrote img2dataset shards to S3; every later stage committed shards of its table there
        assert fs.glob(f"{data}/images/*_stats.json")
        for table in ("scores", "captions", "candidates", "annotations", "small_train", "text_cache/stage3"):
            assert fs.ls(f"{data}/{table}/_done"), f"{table}: no committed shard on S3"
        assert fs.exists(f"{data}/eval/metrics/_summary.json")
        # training read images and captions from S3; each stage's run folder is mirrored there
        for n in (1, 2, 3):
            run = f"{data}/train/stage{n}"
            assert fs.exists(f"{run}/export/paradiffusion.json") and fs.exists(f"{run}/_summary.json")
            assert any(fs.exists(f"{d}/COMMITTED") for d in fs.ls(f"{run}/checkpoints")), f"stage {n}"
        assert fs.exists(f"{data}/annotation_tasks/tasks.json")
        # publish: the dataset folder on S3, with both subsets, images and WebDataset tars
        for f in ("README.md", "croissant.json", "webdataset/index.json"):
            assert fs.exists(f"{data}/paraimage/{f}"), f
        assert fs.glob(f"{data}/paraimage/data/big/*.parquet") and fs.glob(f"{data}/paraimage/data/small/*.parquet")
        assert "Table 1" in fs.cat(f"{data}/paraimage/README.md").decode()
        assert (out / "stats" / "report.md").is_file() and (out / "generated").is_dir()
        assert (out / "eval" / "report" / "index.html").is_file()

        # no credential anywhere: the terminal, every local file (logs, configs, summaries, reports,
        # Ray's session logs), every object written to the bucket
        for planted in (secret, token):
            assert planted not in r.stdout and planted not in r.stderr
        leaks = [
            p for p in _files(out, scratch) if secret.encode() in p.read_bytes() or token.encode() in p.read_bytes()
        ]
        assert not leaks, leaks[:10]
        objects = fs.find(data)
        assert len(objects) > 100
        bad = [o for o in objects if secret.encode() in fs.cat(o) or token.encode() in fs.cat(o)]
        assert not bad, bad[:10]
        # what the saved configs say instead
        cfg_text = fs.cat(f"{data}/scores/_config.yaml").decode()
        assert "token: '**********'" in cfg_text and "storage.token=***" in cfg_text

        # nothing called out of the machine (the one named exception: Ray's cloud-metadata probe)
        starts, attempts = read_log(tmp_path / "guard", local_hosts())
        outside = [q for q in proxy.requests if not any(host in q for host in RAY_CLOUD_PROBE)]
        assert outside == [] and attempts == [], (outside, attempts[:20])
        assert len(starts) >= 5, starts  # the recorder ran in the run's child processes too
    finally:
        proxy.__exit__(None, None, None)
        shutil.rmtree(scratch, ignore_errors=True)
