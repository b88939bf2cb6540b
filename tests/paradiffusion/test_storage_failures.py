"""Storage failures and credentials through the real CLI (``pipelines.cli.main``), against S3
servers on 127.0.0.1: moto's, a second moto stopped mid-run, and a store that refuses every
request (403). Credentials are planted through ``--set``, the ``storage`` section of a config
file and the environment; every failure path ends in one line with its exit code, and no
output, log line or written file holds any of them."""

import http.server
import os
import re
import threading
import uuid
from pathlib import Path

import pytest

from paradiffusion.cli import Command
from paradiffusion.storage import Table, join
from pipelines.cli import main

SET_KEY, SET_SECRET, SET_TOKEN = "SETKEY-7d1c0a", "SETSECRET-4b9e22", "SETTOKEN-a81f3c"
FILE_KEY, FILE_SECRET, FILE_TOKEN = "FILEKEY-5e0b77", "FILESECRET-c3d912", "FILETOKEN-0a6f4e"
ENV_KEY, ENV_SECRET, ENV_TOKEN = "ENVKEY-93aa10", "ENVSECRET-6c2d85", "ENVTOKEN-f47b19"
PLANTED = [SET_KEY, SET_SECRET, SET_TOKEN, FILE_KEY, FILE_SECRET, FILE_TOKEN, ENV_KEY, ENV_SECRET, ENV_TOKEN]


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A config file with credentials in its storage section, credentials in the AWS variables,
    and the --set items that plant a third set; yields (config path, --set args)."""
    run_dir = tmp_path / "run"  # everything a run writes lands here (the config file stays outside)
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("TMPDIR", str(run_dir / "tmp"))  # where a run's log file goes without a local table
    (run_dir / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"storage:\n  key: {FILE_KEY}\n  secret: {FILE_SECRET}\n  token: {FILE_TOKEN}\n")
    sets = ["--set", f"storage.key={SET_KEY}", "--set", f"storage.secret={SET_SECRET}"]
    sets += ["--set", f"storage.token={SET_TOKEN}"]
    return str(cfg), sets


def run(argv, capfd) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capfd.readouterr()
    return rc, out.out + out.err


def assert_clean(text: str, where: str) -> None:
    for s in PLANTED:
        assert s not in text, f"{s} printed in {where}:\n{text}"


def all_files_clean(root: Path) -> int:
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            assert_clean(p.read_text(errors="replace"), str(p))
            n += 1
    return n


def test_config_and_argparse_errors_never_print_a_credential(planted, capfd, tmp_path):
    cfg, sets = planted
    cases = [
        (["config", "--config", cfg, *sets, "--set", "filter.batch_size=abc"], "filter.batch_size"),
        (["config", "--config", cfg, *sets, "--set", f"storage.secret_key={SET_SECRET}"], "storage.secret_key"),
        (["config", "--config", cfg, *sets, "--set", f"storage.secret=[{SET_SECRET}]"], "storage.secret"),
        (["config", "--config", cfg, *sets, "--set", "storage.endpoint_url=ftp://x"], "storage.endpoint_url"),
        (["config", "--config", cfg, *sets, f"storage.secret={SET_SECRET}"], "no section"),
        (["config", "--config", cfg, *sets, "storage", f"--secret={SET_SECRET}"], "unrecognized arguments"),
        (["confg", "--config", cfg, *sets], "invalid choice"),
    ]
    for argv, named in cases:
        rc, text = run(argv, capfd)
        assert rc == 2, (argv, text)
        assert named in text
        assert_clean(text, " ".join(argv[:1]))
    # the valid config prints no credential either
    rc, text = run(["config", "--config", cfg, *sets, "storage"], capfd)
    assert rc == 0 and "**********" in text
    assert_clean(text, "config")
    all_files_clean(tmp_path / "run")


@pytest.mark.parametrize(
    "root,why",
    [
        ("s3:/bucket/x", "mangled URL"),
        ("s3//bucket/x", "mangled URL"),
        ("S3://bucket/x", "lower case"),
        ("s4://bucket/x", "unknown URL scheme"),
    ],
)
def test_a_mangled_data_root_is_a_config_error_naming_the_key(root, why, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    rc, text = run(["download", "--config", os.devnull, "--set", f"project.data_root={root}"], capfd)
    assert rc == 2 and "project.data_root" in text and why in text and root in text
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder named "s3:"


def test_a_mangled_table_url_names_its_key(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    rc, text = run(["config", "--config", os.devnull, "--set", "filter.output=S3://b/scores"], capfd)
    assert rc == 2 and "filter.output" in text and "lower case" in text


def _download_argv(cfg, sets, root, endpoint, tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    return ["download", "--config", cfg, *sets, "--set", f"project.data_root={root}"] + [
        "--set",
        f"storage.endpoint_url={endpoint}",
        "--set",
        f"download.input={urls}",
    ]


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    return lines[0]


def test_a_missing_bucket_is_one_line_and_never_created(planted, s3_server, capfd, tmp_path):
    cfg, sets = planted
    missing = f"no-such-{uuid.uuid4().hex[:8]}"
    rc, text = run(_download_argv(cfg, sets, f"s3://{missing}/data", s3_server.endpoint_url, tmp_path), capfd)
    line = _one_error_line(text)
    assert rc == 2 and f"s3://{missing}/data" in line and "does not exist" in line and "never created" in line
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    assert missing not in [b.rstrip("/") for b in fs.ls("")]
    assert_clean(text, "output")
    all_files_clean(tmp_path / "run")


def test_an_unreachable_endpoint_is_one_line_at_start(planted, capfd, tmp_path):
    cfg, sets = planted
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = _download_argv(cfg, sets, "s3://bucket/data", f"http://127.0.0.1:{port}", tmp_path)
    argv += ["--set", "storage.options={s3: {config_kwargs: {retries: {max_attempts: 1}}}, }"]
    rc, text = run(argv, capfd)
    line = _one_error_line(text)
    assert rc == 2 and "s3://bucket/data" in line and "unreachable" in line and "endpoint_url" in line
    log = re.search(r"traceback: ([^;]+);", line).group(1)
    assert "Traceback" in Path(log).read_text()
    assert_clean(text, "output")
    all_files_clean(tmp_path / "run")


class _Refuse(http.server.BaseHTTPRequestHandler):
    """A store that answers every request 403 AccessDenied."""

    def _deny(self):
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message></Error>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

    def log_message(self, *a):
        pass


def test_a_forbidden_store_is_one_line(planted, capfd, tmp_path):
    cfg, sets = planted
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
        rc, text = run(_download_argv(cfg, sets, "s3://locked/data", endpoint, tmp_path), capfd)
    finally:
        srv.shutdown()
        srv.server_close()
    line = _one_error_line(text)
    assert rc == 2 and "s3://locked/data" in line and "access denied" in line
    assert_clean(text, "output")
    all_files_clean(tmp_path / "run")


def _write_then_lose_the_server(cfg, args):
    """Commits a shard, then the store goes away, then writes another."""
    from paradiffusion.schemas import SCORES

    t = Table(join(cfg.project.data_root, "scores"), SCORES)
    t.clean_tmp()
    import pyarrow as pa

    rows = pa.Table.from_pylist([{"key": "a", "shard": "s", "kept": True}], schema=SCORES)
    t.write_shard("00000", rows)
    LOSE_SERVER[0].stop()
    t.write_shard("00001", rows)
    return 0


LOSE_SERVER: list = [None]
WRITE_THEN_LOSE = Command(help="test", run=_write_then_lose_the_server)


def test_a_server_gone_mid_run_is_one_line_with_rc_1_and_the_traceback_in_the_log(planted, capfd, tmp_path):
    from paradiffusion.cli import run_command
    from paradiffusion.testing.s3 import S3Server
    from pipelines.config import load_config

    cfg, sets = planted
    srv = S3Server()
    LOSE_SERVER[0] = srv
    try:
        root = join(srv.make_bucket("gone"), "data")
        argv = ["w", "--config", cfg, *sets, "--set", f"project.data_root={root}"]
        argv += ["--set", f"storage.endpoint_url={srv.endpoint_url}"]
        argv += ["--set", "storage.options={s3: {config_kwargs: {retries: {max_attempts: 1}}}}"]
        rc = run_command({"w": f"{__name__}:WRITE_THEN_LOSE"}, load_config, argv)
        out = capfd.readouterr()
        text = out.out + out.err
    finally:
        srv.stop()
    line = _one_error_line(text)
    assert rc == 1 and "unreachable" in line and "s3://gone/data/scores" in line and "rerun" in line
    log = re.search(r"traceback: ([^;]+);", line).group(1)
    assert "Traceback" in Path(log).read_text()
    assert_clean(text, "output")
    all_files_clean(tmp_path / "run")
