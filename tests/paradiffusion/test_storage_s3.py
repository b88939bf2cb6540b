"""The storage contract on S3 (moto's server on 127.0.0.1): a store where a move is a copy
and a delete, so only commit markers say what is complete."""

import json
import os
import subprocess
import sys
import tempfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from paradiffusion import storage
from paradiffusion.config import StorageConfig
from paradiffusion.schemas import SCORES
from paradiffusion.storage import Table, resolve_storage_options
from pipelines.config import load_config


def scores(keys, kept=True):
    return pa.Table.from_pylist([{"key": k, "shard": "s", "kept": kept} for k in keys], schema=SCORES)


def test_table_write_commit_read_rewrite(s3_root):
    t = Table(f"{s3_root}/data/scores", SCORES)
    assert t.done_shards() == set() and t.read().num_rows == 0
    t.write_shard("00000", scores(["a", "b"]))
    t.write_shard("00001", scores(["c"]))
    assert t.done_shards() == {"00000", "00001"}
    assert sorted(t.read(columns=["key"])["key"].to_pylist()) == ["a", "b", "c"]
    assert t.count_rows() == 3 and t.markers()["00001"]["rows"] == 1
    t.write_shard("00000", scores(["a", "b"], kept=False))  # a rerun rewrites, never duplicates
    assert t.read().num_rows == 3 and t.read().filter(pa.compute.field("kept")).num_rows == 1
    # the .tmp copies are gone (a move on S3 is copy + delete) and the files are full URLs
    assert not t.fs.exists(t._p(".tmp")) or t.fs.ls(t._p(".tmp")) == []
    assert t.files() == [f"{s3_root}/data/scores/part-00000.parquet", f"{s3_root}/data/scores/part-00001.parquet"]
    assert pq.read_table(t.files()[1], filesystem=t.fs)["key"].to_pylist() == ["c"]


def test_leftovers_of_a_killed_run_are_ignored_then_cleaned(s3_root):
    t = Table(f"{s3_root}/scores", SCORES)
    t.write_shard("00000", scores(["a"]))
    # What a kill leaves on S3: a half-written temp object, a shard copied to its final name
    # whose marker never came, and a temp copy the move did not get to delete.
    t.fs.pipe(t._p(".tmp", "junk-part-00002.parquet"), b"PAR1 half")
    t.fs.pipe(t.shard_file("00001"), b"PAR1 half")
    t.fs.pipe(t._p(".tmp", "abc-part-00000.parquet"), t.fs.cat(t.shard_file("00000")))
    assert t.done_shards() == {"00000"}
    assert t.read().num_rows == 1 and [s for s, _ in t.iter_shards()] == ["00000"]
    assert t.clean_tmp() == 3
    assert not t.fs.exists(t.shard_file("00001")) and t.fs.exists(t.shard_file("00000"))
    assert t.read()["key"].to_pylist() == ["a"]


def test_a_marker_written_by_another_process_is_seen(s3_root, s3_server):
    """No stale listing: a worker (another process, another node) commits, the driver sees it."""
    t = Table(f"{s3_root}/captions", SCORES)
    t.write_shard("00000", scores(["a"]))
    assert t.done_shards() == {"00000"}
    other = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options())
    buf = pa.BufferOutputStream()
    pq.write_table(scores(["b"]), buf)
    other.pipe(t.shard_file("00001").removeprefix("s3://"), buf.getvalue().to_pybytes())
    other.pipe(t.marker_file("00001"), json.dumps({"shard": "00001", "rows": 1}).encode())
    assert t.done_shards() == {"00000", "00001"}
    assert t.is_done("00001") and t.count_rows() == 2


def test_workers_get_the_settings_explicitly_not_from_the_environment(s3_root):
    """What a Ray task or actor receives is enough: a process without any AWS variable reads the table."""
    Table(f"{s3_root}/t", SCORES).write_shard("00000", scores(["a", "b"]))
    opts = storage.worker_storage_options()
    assert opts["s3"]["endpoint_url"].startswith("http://127.0.0.1:")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    code = (
        "import json, sys\n"
        "from paradiffusion.storage import Table, apply_storage_options\n"
        "apply_storage_options(json.loads(sys.stdin.read()))\n"
        f"print(Table({s3_root + '/t'!r}).read().num_rows, flush=True)\n"
        # Leave without interpreter teardown: pyarrow's thread pools can abort a process at exit after
        # reading through a Python (fsspec) file, rarely and under load (apache/arrow#34314, #39162);
        # what this test checks is the row count printed above, not pyarrow's shutdown.
        "import os; os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(opts), env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2"
    # ...and without them it cannot (so the test above proves the hand-over, not an ambient setting)
    bare = subprocess.run(
        [sys.executable, "-c", code.replace("apply_storage_options(json.loads(sys.stdin.read()))", "")],
        env={**env, "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bare.returncode != 0


def test_settings_come_from_the_section_or_the_aws_variables():
    env = {
        "AWS_ENDPOINT_URL": "http://env:9000",
        "AWS_ACCESS_KEY_ID": "envkey",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s3 = resolve_storage_options(None, env)["s3"]
    assert s3["endpoint_url"] == "http://env:9000" and s3["key"] == "envkey" and s3["secret"] == "envsecret"
    assert s3["client_kwargs"] == {"region_name": "eu-west-1"} and s3["use_listings_cache"] is False
    cfg = StorageConfig(
        endpoint_url="http://cfg:9000", region="us-east-2", key="k1", secret="s1", options={"s3": {"anon": False}}
    )
    s3 = resolve_storage_options(cfg, env)["s3"]
    assert s3["endpoint_url"] == "http://cfg:9000" and (s3["key"], s3["secret"]) == ("k1", "s1")
    assert s3["client_kwargs"] == {"region_name": "us-east-2"} and s3["anon"] is False
    # nothing given: botocore's own chain decides (instance roles, config files)
    assert resolve_storage_options(None, {})["s3"] == {"use_listings_cache": False}
    # a profile in the section wins over keys in the environment
    s3 = resolve_storage_options(StorageConfig(profile="prod"), env)["s3"]
    assert s3["profile"] == "prod" and "key" not in s3


def test_bad_storage_settings_name_the_key():
    with pytest.raises(Exception, match=r"storage.endpoint_url"):
        load_config(None, ["storage.endpoint_url=127.0.0.1:9000"])
    with pytest.raises(Exception, match=r"storage.bogus: unknown key"):
        load_config(None, ["storage.bogus=1"])


def test_saved_configs_never_hold_the_secret(s3_root):
    secret = "PLANTED-SECRET-4b1d"
    cfg = load_config(
        None, [f"storage.secret={secret}", "storage.key=AKIAPLANTED", "storage.options={gcs: {token: PLANTED-OPT}}"]
    )
    assert resolve_storage_options(cfg.storage, {})["gcs"] == {"token": "PLANTED-OPT"}  # used, never shown
    t = Table(f"{s3_root}/scores", SCORES)
    t.save_config(cfg, "filter", section=cfg.filter)
    text = t.fs.cat(t._p("_config.yaml")).decode()
    assert secret not in text and "AKIAPLANTED" not in text and "PLANTED-OPT" not in text
    assert yaml.safe_load(text)["config"]["storage"]["secret"] == "**********"
    assert secret not in repr(cfg) and secret not in str(cfg.model_dump())
    assert yaml.safe_load(text)["config"]["storage"]["options"] == {"gcs": {"token": "**********"}}


@pytest.mark.slow
def test_ray_workers_get_the_settings_without_the_driver_environment(s3_root):
    """A Ray started without any AWS or FSSPEC variable: its workers still read the S3 table,
    through the setup hook init_ray installs (as on a cluster whose nodes share nothing)."""
    Table(f"{s3_root}/t", SCORES).write_shard("00000", scores(["a", "b", "c"]))
    code = f"""
import json, os, sys
from paradiffusion.storage import apply_storage_options
apply_storage_options(json.loads(sys.stdin.read()))
for k in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_"))]:
    del os.environ[k]
import ray
from paradiffusion.config import RayConfig
from paradiffusion.raycluster import init_ray
init_ray(RayConfig(address="local", num_cpus=1))

@ray.remote
def rows():
    from paradiffusion.storage import Table
    return Table({s3_root + "/t"!r}).read().num_rows

print("rows", ray.get(rows.remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="pd-ray-", dir="/tmp")  # short: Ray's socket paths
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(storage.worker_storage_options()),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rows 3" in out.stdout


def test_folder_upload_puts_the_marker_last_and_download_needs_it(s3_root, tmp_path):
    src = tmp_path / "export"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights.bin").write_bytes(b"w" * 1000)
    (src / "paradiffusion.json").write_text('{"step": 3}')
    fs = storage.storage_filesystem(s3_root)
    # no marker there yet: nothing to fetch
    assert not storage.download_folder(f"{s3_root}/run/export", tmp_path / "got", "paradiffusion.json")
    order = []
    put = fs.put_file
    fs.put_file = lambda lpath, rpath, **kw: (order.append(rpath.rsplit("/", 1)[-1]), put(lpath, rpath, **kw))
    try:
        assert storage.upload_folder(src, f"{s3_root}/run/export", last="paradiffusion.json") == 2
    finally:
        del fs.put_file
    assert order == ["weights.bin", "paradiffusion.json"]
    assert storage.download_folder(f"{s3_root}/run/export", tmp_path / "got", "paradiffusion.json")
    assert (tmp_path / "got" / "unet" / "weights.bin").read_bytes() == b"w" * 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".got.tmp")]


def _boom(cfg, args):
    from paradiffusion.log import get_logger

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    get_logger("test").warning("connecting with secret %s", secret)
    raise RuntimeError(f"the store refused secret {secret}")


def _config_error(cfg, args):
    from paradiffusion.config import ConfigError

    raise ConfigError(f"storage.secret = {os.environ['AWS_SECRET_ACCESS_KEY']!r} is wrong")


BOOM = None  # set below (a Command needs the functions defined first)


def test_errors_and_log_lines_never_show_a_credential(monkeypatch, capfd, caplog):
    from paradiffusion import log as pd_log
    from paradiffusion.cli import Command, run_command

    global BOOM, CONFIG_ERROR
    BOOM = Command(help="fails", run=_boom)
    CONFIG_ERROR = Command(help="fails", run=_config_error)
    secret = "PLANTED-SECRET-9f8e7d"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    saved = set(pd_log._SECRETS), {k: v for k, v in os.environ.items() if k.startswith("FSSPEC_")}
    try:
        cmds = {"boom": f"{__name__}:BOOM", "cfg": f"{__name__}:CONFIG_ERROR"}
        assert run_command(cmds, load_config, ["boom", "--config", os.devnull]) == 1
        assert run_command(cmds, load_config, ["cfg", "--config", os.devnull]) == 2
        # a malformed credential in --set: the validation error does not echo it either
        bad = ["boom", "--config", os.devnull, "--set", f"storage.secret=[{secret}]"]
        assert run_command(cmds, load_config, bad) == 2
        err = capfd.readouterr().err
        assert "the store refused secret ***" in err and "connecting with secret ***" in caplog.text
        assert "storage.secret = '***' is wrong" in err and "storage.secret = ***" in err
        assert secret not in err and secret not in caplog.text
    finally:
        pd_log._SECRETS.clear()
        pd_log._SECRETS.update(saved[0])
        for k in [k for k in os.environ if k.startswith("FSSPEC_")]:
            del os.environ[k]
        os.environ.update(saved[1])
        fsspec.config.conf.pop("s3", None)
        storage._CONFIGURED.clear()
