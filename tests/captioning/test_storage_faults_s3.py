"""A store that fails mid-run: the caption stage on S3 (moto's server on 127.0.0.1) through a
proxy that forwards until two caption shards are committed, then refuses connections, answers
403 or answers 503 for good. The run ends in one line (URL, operation, cause) with rc 1 for what
may pass and 2 for what configuration must fix, the traceback only in the run's log file; with
the proxy forwarding again, a rerun resumes, and the table equals an uninterrupted local run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from caption_fixtures import write_dataset

from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table, upload_folder
from paradiffusion.testing.faulty_proxy import FaultyProxy
from pipelines.cli import main

#: what two runs of the same captioner on the same images must agree on (not times)
SAME = ["key", "caption", "n_words", "n_tokens", "model_id", "prompt_id", "prompt_hash", "finish_reason", "error"]
MARKER_PUT = r"^PUT /[^?]*/captions/_done/[^?]*\.json"


def _config(path: Path, tiny_vlm: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "caption": {
                    "captioner": "tiny",
                    "captioners": {
                        "tiny": {"type": "transformers", "model": tiny_vlm, "dtype": "float32", "device": "cpu"}
                    },
                    "generation": {"max_new_tokens": 8},
                    "batch_size": 2,
                    "chunk_rows": 2,
                    "resources": {"executor": "local"},
                },
            }
        )
    )
    return str(path)


def _cli(cfg: str, root: str, capfd, *sets: str) -> tuple[int, str, str]:
    argv = ["caption", "--config", cfg, "--set", f"project.data_root={root}"]
    for s in sets:
        argv += ["--set", s]
    rc = main(argv)
    out = capfd.readouterr()
    return rc, out.out, out.err


def _rows(root: str) -> list[dict]:
    t = Table(f"{root}/captions", CAPTIONS).read(columns=SAME).sort_by("key")
    return t.to_pylist()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_vlm):
    """The same dataset captioned on local disk, uninterrupted: what every faulted run must end with."""
    base = tmp_path_factory.mktemp("local")
    info = write_dataset(base / "data", n_shards=2, per_shard=6, broken=False)
    cfg = _config(base / "caption.yaml", tiny_vlm)
    assert main(["caption", "--config", cfg, "--set", f"project.data_root={info['root']}"]) == 0
    rows = _rows(info["root"])
    assert sorted(r["key"] for r in rows) == sorted(info["expected"])
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,rc,cause",
    [("refuse", 1, "endpoint unreachable"), ("503", 1, "throttling or unavailable"), ("403", 2, "access denied")],
)
def test_a_store_failing_mid_run_is_one_line_and_a_rerun_resumes(
    mode, rc, cause, local_run, tiny_vlm, s3_server, s3_root, tmp_path, capfd
):
    info = write_dataset(tmp_path / "data", n_shards=2, per_shard=6, broken=False)
    for name in ("images", "scores"):  # straight to moto: only the stage's requests go through the proxy
        upload_folder(Path(info["root"], name), f"{s3_root}/data/{name}")
    root = f"{s3_root}/data"
    cfg = _config(tmp_path / "caption.yaml", tiny_vlm)
    out = Table(f"{root}/captions", CAPTIONS)
    with FaultyProxy(s3_server.endpoint_url) as proxy:
        sets = (
            f"storage.endpoint_url={proxy.endpoint_url}",
            # few retries keep the test short; what is checked is what happens once they are spent
            "storage.options={s3: {config_kwargs: {retries: {max_attempts: 2}, connect_timeout: 5}}}",
        )
        proxy.fail_after(2, MARKER_PUT, mode)
        code, stdout, stderr = _cli(cfg, root, capfd, *sets)
        assert proxy.mode == mode, "the run ended before its second shard was committed"

        # one line naming the URL, the operation and the cause; the traceback in the log file only
        lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, stderr[-3000:]
        line = lines[0]
        assert code == rc, stderr[-3000:]
        assert cause in line and "rerun" in line, line
        url = re.search(r"storage: (\S+) (s3://\S+) failed", line)
        assert url, line  # "storage: <operation> <URL> failed: <cause>"
        assert url.group(2).startswith(f"{s3_root}/data/"), line
        assert "Traceback" not in stderr and "Traceback" not in stdout
        log = Path(re.search(r"traceback: ([^;]+);", line).group(1))
        assert "Traceback" in log.read_text()

        # the committed state is intact: two shards and their rows, nothing marked done that is not whole
        committed = {s: out.marker(s) for s in out.done_shards()}
        assert len(committed) >= 2
        before = {r["key"]: r for r in out.read().to_pylist()}
        assert 0 < len(before) < len(info["expected"])

        proxy.set_mode("forward")
        code, stdout, stderr = _cli(cfg, root, capfd, *sets)
        assert code == 0, stderr[-3000:]
        summary = out.load_json("_summary.json")
        assert summary["skipped_already_done"] == len(before), summary
        assert summary["out"] == len(info["expected"]) - len(before), summary

        # (read through the proxy: the runs made it this process's endpoint)
        # nothing lost, nothing duplicated, and the same captions as a run that was never interrupted
        assert _rows(root) == local_run
        after = {r["key"]: r for r in out.read().to_pylist()}
        assert {k: after[k]["created_at"] for k in before} == {k: r["created_at"] for k, r in before.items()}
        assert {s: out.marker(s) for s in committed} == committed  # the committed shards were not redone
        parts = {f.rsplit("/", 1)[-1] for f in out.fs.ls(out.path, detail=False) if "/part-" in f}
        assert parts == {f"part-{s}.parquet" for s in out.done_shards()}  # no shard without its marker is left


def test_a_store_failure_on_an_image_read_stops_the_run_and_a_missing_shard_is_an_error_row(
    s3_server, s3_root, tmp_path, monkeypatch
):
    """The decode step turns a missing or broken shard into error rows (counted, retried), but a
    store that refuses or forbids is no property of the shard: it raises, with its cause, so the
    run stops with the one-line storage failure instead of writing error captions."""
    from captioning.config import ImagePrep
    from captioning.prep import decode_chunk
    from paradiffusion import storage
    from paradiffusion.config import StorageConfig
    from paradiffusion.storage_errors import describe_failure

    info = write_dataset(tmp_path / "data", n_shards=1, per_shard=3, broken=False)
    upload_folder(Path(info["root"], "images"), f"{s3_root}/images")
    keys = sorted(info["expected"])
    chunk = {"name": "c0", "keys": keys, "parquet_url": f"{s3_root}/images/00000.parquet"}
    with FaultyProxy(s3_server.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        no_retries = {"s3": {"config_kwargs": {"retries": {"max_attempts": 1}}}}  # what is checked is the end
        storage.configure_storage(StorageConfig(options=no_retries))
        rows = list(decode_chunk(chunk, ImagePrep()))
        assert [r["key"] for r in rows] == keys and all(r["error"] is None for r in rows)
        missing = list(decode_chunk({**chunk, "parquet_url": f"{s3_root}/images/00009.parquet"}, ImagePrep()))
        assert [r["error"].split(":", 1)[0] for r in missing] == ["read_error"] * len(keys)
        for mode, kind in (("403", "access denied"), ("refuse", "endpoint unreachable")):
            proxy.set_mode(mode)
            with pytest.raises(Exception) as exc:  # noqa: PT011 - whatever the client raises, described below
                list(decode_chunk(chunk, ImagePrep()))
            failure = describe_failure(exc.value)
            assert failure is not None and kind in str(failure), exc.value
            assert chunk["parquet_url"] in str(failure)
