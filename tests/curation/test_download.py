"""The download stage against a local HTTP server serving the bundled sample.

Expected outcomes are computed from the sample records (their kind and image sizes),
not hard-coded, so a change to the sample keeps the tests honest.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.download import (
    REASON_SHARD_FAILED,
    expected_shards,
    failure_reason,
    resolve_url_list,
    run_download,
)
from paradiffusion.config import ConfigError
from paradiffusion.images import image_shards
from paradiffusion.testing.http import serve_folder
from paradiffusion.testing.sample import build_sample, write_url_list
from pipelines.cli import main
from pipelines.config import load_config

MIN_SIZE = 128
MAX_ASPECT = 3.0
TIMEOUT = 4
# URL path (under the server) -> (alt text, the reason a correct download gives)
EXTRAS = {
    "missing/gone.jpg": ("a picture that is gone", "http_404"),
    "html/page.jpg": ("an html page", "not_an_image"),
    f"slow/{TIMEOUT * 4}/images/chelsea.jpg": ("a slow server", "timeout"),
    "error/oops.jpg": ("a broken server", "http_500"),
}
INVALID = {"": "empty url", "not a url": "junk in the url column"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    records = build_sample(root / "sample")
    with serve_folder(str(root / "sample")) as base_url:
        yield root, records, base_url


def cfg_for(tmp: Path, url_list: Path, *sets: str):
    return load_config(
        [],
        [
            f"project.data_root={tmp / 'data'}",
            f"download.input={url_list}",
            "download.processes_count=1",
            "download.thread_count=4",
            f"download.timeout={TIMEOUT}",
            *sets,
        ],
    )


def read_rows(images: Path) -> list[dict]:
    files = sorted(glob.glob(str(images / "*.parquet")))
    cols = ["key", "url", "caption", "status", "error_message", "width", "height", "original_width", "original_height"]
    return pq.read_table(files, columns=cols + ["jpg"]).to_pylist() if files else []


def expected_reason(rec, sample_dir: Path) -> str | None:
    """What a download that decodes (disable_all_reencoding=false) must say about one sample
    file (None: success)."""
    path = sample_dir / "images" / rec.name
    if rec.expect == "decompression_bomb":
        return "area_too_large"  # refused from the header, before OpenCV decodes it
    if rec.kind == "broken":
        return "empty_response" if path.stat().st_size == 0 else "not_an_image"
    if rec.expect == "animated":
        return None  # stored as downloaded: the filter decides
    w, h = Image.open(path).size
    if min(w, h) < MIN_SIZE:
        return "too_small"
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return "aspect_ratio"
    return None


# --------------------------------------------------------------------------- unit
@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("Image decoding error", "not_an_image"),
        ("image too small", "too_small"),
        ("aspect ratio too large", "aspect_ratio"),
        ("image area too large", "area_too_large"),
        ("unknown url type: ''", "invalid_url"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "ssl_error"),
        ("Use of image disallowed by X-Robots-Tag directive", "opted_out"),
        ("denylisted: re-laion-csam (sha256)", "denylisted"),
        ("nsfw: input punsafe 0.970 > 0.5", "nsfw"),
        ("something nobody has seen", "other"),
        (None, "other"),
    ],
)
def test_failure_reason(message, reason):
    assert failure_reason(message) == reason


def test_expected_shards_follow_img2dataset_cutting():
    # img2dataset cuts each file on its own; shard ids run on across files.
    assert expected_shards([5, 2], 2) == {"00000": 2, "00001": 2, "00002": 1, "00003": 2}
    assert expected_shards([0], 3) == {}


def test_config_errors_name_allowed_values():
    with pytest.raises(ConfigError, match="download.resize_mode.*'no', 'keep_ratio'"):
        load_config([], ["download.resize_mode=shrink"])
    with pytest.raises(ConfigError, match="png"):
        load_config([], ["download.encode_format=png", "download.encode_quality=95"])
    with pytest.raises(ConfigError, match="distributor.*'multiprocessing', 'ray'"):
        load_config([], ["download.distributor=spark"])
    with pytest.raises(ConfigError, match="reserves"):
        load_config([], ["download.save_additional_columns=[status]"])
    # nothing is decoded by default, so a resize or a size check at download would be ignored: refused
    with pytest.raises(ConfigError, match="resize_mode='keep_ratio'.*disable_all_reencoding=false"):
        load_config([], ["download.resize_mode=keep_ratio"])
    load_config([], ["download.resize_mode=keep_ratio", "download.disable_all_reencoding=false"])


def test_the_guard_refuses_bombs_before_opencv_and_keeps_animations(tmp_path, monkeypatch):
    import io

    import cv2

    from curation.resize_guard import GuardedResizer

    records = build_sample(tmp_path)
    data = {r.name: (tmp_path / "images" / r.name).read_bytes() for r in records}
    resizer = GuardedResizer(1024, "no", True, disable_all_reencoding=False, max_image_area=100_000_000)

    def no_decoding(*a, **k):
        raise AssertionError("OpenCV was asked to decode a bomb")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    for name in ("bomb.png", "bomb.gif", "bomb.jpg"):
        img, *_, err = resizer(io.BytesIO(data[name]))
        assert (
            img is None
            and err.startswith("image area too large: 30000x30000")
            and failure_reason(err) == ("area_too_large")
        )
    for name in ("animated.gif", "animated.webp", "animated.png"):
        img, w, h, ow, oh, err = resizer(io.BytesIO(data[name]))
        assert err is None and img == data[name] and (w, h) == (ow, oh) == (320, 240)
    monkeypatch.undo()
    img, w, h, *_, err = resizer(io.BytesIO(data["astronaut.jpg"]))  # everything else: img2dataset as usual
    assert err is None and (w, h) == (512, 512)


def test_url_counts_agree_with_what_urllib_does(tmp_path):
    urls = ["http://h/a.jpg", " https://h/b.jpg ", "http://exa mple.com/c.jpg", "ftp://127.0.0.1/x.jpg",
            "file:///etc/hostname", "", None, "not a url", "http:/h/one-slash.jpg", "mailto:x@y"]  # fmt: skip
    pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), tmp_path / "urls.parquet")
    ul = resolve_url_list(load_config([], [f"download.input={tmp_path / 'urls.parquet'}"]).download, str(tmp_path))
    # empty, None, no scheme, no host, unknown scheme: refused at once (invalid_url); ftp/file: fetched
    assert (ul.invalid_urls, ul.other_scheme_urls, ul.n_rows) == (5, 2, len(urls))
    for u in ("", "not a url", "http:/h/one-slash.jpg", "mailto:x@y"):
        assert failure_reason(_urllib_error(u)) == "invalid_url", u


def _urllib_error(url: str) -> str:
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url), timeout=1)
    except Exception as exc:  # noqa: BLE001 - the message img2dataset records
        return str(exc)
    return "no error"


def test_an_empty_url_list_is_an_error(tmp_path):
    pq.write_table(
        pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), tmp_path / "e.parquet"
    )
    with pytest.raises(ConfigError, match="has no rows"):
        run_download(cfg_for(tmp_path, tmp_path / "e.parquet"))


def test_columns_detected_or_named_in_the_error(tmp_path):
    staging = str(tmp_path / "staging")
    pq.write_table(
        pa.table({"URL": ["http://x/a.jpg"], "TEXT": ["a"], "similarity": [0.3]}), tmp_path / "laion.parquet"
    )
    ul = resolve_url_list(load_config([], [f"download.input={tmp_path / 'laion.parquet'}"]).download, staging)
    assert (ul.url_col, ul.caption_col, ul.input_format, ul.n_rows) == ("URL", "TEXT", "parquet", 1)

    pq.write_table(pa.table({"link_to_it": ["http://x"], "words": ["a"]}), tmp_path / "odd.parquet")
    with pytest.raises(ConfigError, match=r"no URL column.*columns found: \['link_to_it', 'words'\]"):
        resolve_url_list(load_config([], [f"download.input={tmp_path / 'odd.parquet'}"]).download, staging)
    cfg = load_config([], [f"download.input={tmp_path / 'odd.parquet'}", "download.url_col=link_to_it"])
    with pytest.raises(ConfigError, match="no caption"):
        resolve_url_list(cfg.download, staging)
    cfg = load_config([], [f"download.input={tmp_path / 'odd.parquet'}", "download.url_col=nope"])
    with pytest.raises(ConfigError, match="url_col = 'nope'.*columns found"):
        resolve_url_list(cfg.download, staging)
    with pytest.raises(ConfigError, match="download.input is not set"):
        resolve_url_list(load_config([], []).download, staging)
    (tmp_path / "list.txt").write_text("http://x/a.jpg\n")
    with pytest.raises(ConfigError, match="input_format"):
        resolve_url_list(load_config([], [f"download.input={tmp_path / 'list.txt'}"]).download, staging)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("url_col, caption_col", [("url", "caption"), ("URL", "TEXT")])
def test_every_format_is_read(tmp_path, fmt, url_col, caption_col, served):
    root, records, base = served
    path = write_url_list(records, base, tmp_path / f"urls.{fmt}", fmt=fmt, url_col=url_col, caption_col=caption_col)
    ul = resolve_url_list(load_config([], [f"download.input={path}"]).download, str(tmp_path / "staging"))
    assert (ul.input_format, ul.url_col, ul.caption_col) == (fmt, url_col, caption_col)
    assert ul.n_rows == len(records) and ul.invalid_urls == 0


def test_folder_and_glob_inputs_count_rows_and_invalid_urls(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    for i in range(3):
        rows = [{"url": f"http://h/{i}-{j}.jpg", "caption": "c"} for j in range(i + 1)]
        rows.append({"url": "" if i else None, "caption": "bad"})
        with open(folder / f"part-{i}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    staging = str(tmp_path / "staging")
    ul = resolve_url_list(load_config([], [f"download.input={folder}"]).download, staging)
    assert ul.input_format == "jsonl" and ul.url_list == str(folder) and ul.rows_per_file == [2, 3, 4]
    assert ul.invalid_urls == 3
    # A glob over the whole folder is the folder; a subset becomes a folder of links.
    ul = resolve_url_list(load_config([], [f"download.input={folder}/*.jsonl"]).download, staging)
    assert ul.url_list == str(folder)
    ul = resolve_url_list(load_config([], [f"download.input={folder}/part-[02].jsonl"]).download, staging)
    assert ul.url_list == staging and ul.rows_per_file == [2, 4]
    assert sorted(p.name for p in Path(staging).iterdir()) == ["00000_part-0.jsonl", "00001_part-2.jsonl"]
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_url_list(load_config([], [f"download.input={folder}/nothing-*.jsonl"]).download, staging)


# --------------------------------------------------------------------------- against the server
def test_laion_parquet_every_url_has_a_row_reasons_and_resume(served, tmp_path):
    root, records, base = served
    url_list = write_url_list(
        records,
        base,
        tmp_path / "laion.parquet",
        url_col="URL",
        caption_col="TEXT",
        extra_urls={path: caption for path, (caption, _) in EXTRAS.items()},
    )
    t = pq.read_table(url_list)
    t = pa.concat_tables([t, pa.table({"URL": list(INVALID), "TEXT": list(INVALID.values())})])
    pq.write_table(t, url_list)
    urls = t["URL"].to_pylist()
    captions = dict(zip(urls, t["TEXT"].to_pylist(), strict=True))

    want: dict[str, str | None] = {f"{base}/images/{r.name}": expected_reason(r, root / "sample") for r in records}
    want.update({f"{base}/{path}": reason for path, (_, reason) in EXTRAS.items()})
    want.update({u: "invalid_url" for u in INVALID})
    assert len(want) == len(urls)

    cfg = cfg_for(
        tmp_path,
        url_list,
        "download.disable_all_reencoding=false",
        f"download.min_image_size={MIN_SIZE}",
        f"download.max_aspect_ratio={MAX_ASPECT}",
        "download.number_sample_per_shard=16",
    )
    summary = run_download(cfg).to_dict()
    images = tmp_path / "data" / "images"

    # Every input URL has exactly one row, success or failure, with a unique key.
    rows = read_rows(images)
    assert sorted(r["url"] for r in rows) == sorted(urls)
    assert len({r["key"] for r in rows}) == len(rows)
    got = {r["url"]: (None if r["status"] == "success" else failure_reason(r["error_message"])) for r in rows}
    assert got == want

    # The summary agrees with the fixture: in, out, and each reason.
    counts = collections.Counter(v for v in want.values() if v is not None)
    assert summary["in"] == len(urls)
    assert summary["out"] == sum(v is None for v in want.values())
    assert summary["rejected"] == dict(counts)
    assert summary["in"] == summary["out"] + summary["rejected_total"]
    assert summary["input_invalid_urls"] == len(INVALID)
    assert "HTTP Error 404: Not Found" in summary["failure_detail"]["http_404"]
    # a bomb is refused from its header, with its size; an animation is stored byte for byte
    bombs = [r for r in rows if "bomb" in r["url"]]
    assert bombs and all("30000x30000" in r["error_message"] for r in bombs)
    for r in rows:
        if "/animated." in r["url"]:
            assert r["jpg"] == (root / "sample" / "images" / r["url"].rsplit("/", 1)[-1]).read_bytes()
    assert json.loads((images / "_summary.json").read_text())["out"] == summary["out"]
    assert "download" in (images / "_config.yaml").read_text()

    # resize_mode "no" keeps originals: the source size, and a JPEG byte for byte.
    for r in rows:
        if r["status"] != "success" or "/animated." in r["url"]:
            continue
        src = root / "sample" / "images" / r["url"].rsplit("/", 1)[-1]
        assert (r["width"], r["height"]) == (r["original_width"], r["original_height"]) == Image.open(src).size
        assert r["caption"] == captions[r["url"]]
        data = src.read_bytes()
        if data[6:10] in (b"JFIF", b"Exif"):  # the JPEGs img2dataset recognises (imghdr) are kept as is
            assert hashlib.sha256(r["jpg"]).digest() == hashlib.sha256(data).digest()
    # The shared reader sees every shard.
    assert len(image_shards(str(images))) == summary["shards"] == len(expected_shards([len(urls)], 16))

    # A rerun skips complete shards and duplicates nothing.
    again = run_download(cfg).to_dict()
    assert again["skipped_already_done"] == summary["shards"]
    assert (again["in"], again["out"], again["rejected"]) == (summary["in"], summary["out"], summary["rejected"])
    assert sorted(r["key"] for r in read_rows(images)) == sorted(r["key"] for r in rows)

    # A shard whose _stats.json is missing (killed mid-shard) is redone, replacing its file.
    (images / "00001_stats.json").unlink()
    (images / "00001.parquet").write_bytes(b"PAR1 half written")
    third = run_download(cfg).to_dict()
    assert third["skipped_already_done"] == summary["shards"] - 1
    assert (third["out"], third["rejected"]) == (summary["out"], summary["rejected"])
    assert sorted(r["key"] for r in read_rows(images)) == sorted(r["key"] for r in rows)

    # Resuming with another shard layout would mix shards: refused, with the way out.
    with pytest.raises(ConfigError, match="number_sample_per_shard.*overwrite"):
        run_download(cfg_for(tmp_path, url_list, "download.number_sample_per_shard=8"))


@pytest.mark.parametrize(
    "fmt, url_col, caption_col",
    [
        ("csv", "url", "caption"),
        # The same path with another reader: covered fast by test_every_format_is_read; downloaded here.
        pytest.param("tsv", "URL", "TEXT", marks=pytest.mark.slow),
        pytest.param("jsonl", "url", "TEXT", marks=pytest.mark.slow),
    ],
)
def test_text_formats_through_the_cli(served, tmp_path, fmt, url_col, caption_col, capfd):
    root, records, base = served
    photos = [r for r in records if r.kind == "photo"][:3]
    url_list = write_url_list(
        photos,
        base,
        tmp_path / f"urls.{fmt}",
        fmt=fmt,
        url_col=url_col,
        caption_col=caption_col,
        extra_urls={"missing/x.jpg": "gone"},
    )
    args = ["download", "--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for s in (
        f"project.data_root={tmp_path / 'data'}",
        f"download.input={url_list}",
        "download.processes_count=1",
        "download.thread_count=4",
        f"download.timeout={TIMEOUT}",
    ):
        args += ["--set", s]
    assert main(args) == 0
    err = capfd.readouterr().err
    assert "== download: summary" in err and "download: 100%" in err  # our one bar
    # img2dataset's own lines (even from its worker processes) are in the log file, not on the console
    assert "Starting the downloading" not in err
    (log_file,) = (tmp_path / "data" / "images" / "_logs").glob("download-*.log")
    assert "Starting the downloading" in log_file.read_text()
    summary = json.loads((tmp_path / "data" / "images" / "_summary.json").read_text())
    assert (summary["in"], summary["out"], summary["rejected"]) == (4, 3, {"http_404": 1})
    rows = read_rows(tmp_path / "data" / "images")
    assert sorted(r["caption"] or "" for r in rows) == sorted([r.caption for r in photos] + ["gone"])


def test_unfinished_shards_are_counted_not_dropped(served, tmp_path, monkeypatch):
    """If img2dataset gives up on a shard, its rows are reported, and the CLI says to rerun."""
    root, records, base = served
    url_list = write_url_list(records[:3], base, tmp_path / "urls.parquet")
    cfg = cfg_for(tmp_path, url_list)
    monkeypatch.setattr("curation.download._run_img2dataset", lambda *a, **k: None)  # nothing finishes
    summary = run_download(cfg)
    assert summary.n_in == 3 and summary.n_out == 0 and summary.rejected == {REASON_SHARD_FAILED: 3}


@pytest.mark.slow
def test_ray_distributor(served, tmp_path):
    """img2dataset's Ray distributor on the Ray that init_ray starts (local here)."""
    root, records, base = served
    photos = [r for r in records if r.kind == "photo"][:4]
    url_list = write_url_list(photos, base, tmp_path / "urls.parquet", extra_urls={"missing/x.jpg": "gone"})
    cfg = cfg_for(
        tmp_path,
        url_list,
        "download.distributor=ray",
        "download.number_sample_per_shard=2",
        "ray.address=local",
        "ray.num_cpus=2",
    )
    summary = run_download(cfg)
    assert (summary.n_in, summary.n_out, dict(summary.rejected)) == (5, 4, {"http_404": 1})
    assert len(read_rows(tmp_path / "data" / "images")) == 5


@pytest.mark.slow
def test_sigkill_then_rerun_loses_and_duplicates_nothing(served, tmp_path):
    """Kill the whole download (SIGKILL, process group) after its first shard, rerun, compare."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, records, base = served
    # The last shards hold slow URLs (each waits for the timeout), so the run is busy when killed.
    extra = {f"slow/{TIMEOUT + 1}/images/{r.name}": r.caption for r in records[:4]}
    url_list = write_url_list(records[:4], base, tmp_path / "urls.parquet", extra_urls=extra)
    n = len(records[:4]) + len(extra)
    sets = [
        f"project.data_root={tmp_path / 'data'}",
        f"download.input={url_list}",
        "download.processes_count=1",
        "download.thread_count=1",
        "download.number_sample_per_shard=2",
        f"download.timeout={TIMEOUT}",
    ]
    (tmp_path / "none.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "paradiffusion", "download", "--config", str(tmp_path / "none.yaml")]
    for s in sets:
        cmd += ["--set", s]
    images = tmp_path / "data" / "images"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(images.glob("*_stats.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list(images.glob("*_stats.json")))
    assert 1 <= done_before < n // 2, "the kill should land mid-run"

    summary = run_download(load_config([], sets)).to_dict()
    assert summary["skipped_already_done"] == done_before
    rows = read_rows(images)
    assert sorted(r["url"] for r in rows) == sorted(pq.read_table(url_list)["url"].to_pylist())
    assert len({r["key"] for r in rows}) == n
    assert (summary["in"], summary["out"], summary["rejected"]) == (n, 4, {"timeout": 4})


def test_overwrite_starts_over(served, tmp_path, monkeypatch):
    root, records, base = served
    url_list = write_url_list(records[:3], base, tmp_path / "urls.parquet")
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "00000_stats.json").write_text('{"count": 3, "successes": 3, "status_dict": {"success": 3}}')
    (images / "_config.yaml").write_text("config:\n  download:\n    number_sample_per_shard: 99\n")
    monkeypatch.setattr("curation.download._run_img2dataset", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="number_sample_per_shard = 99"):
        run_download(cfg_for(tmp_path, url_list))
    summary = run_download(cfg_for(tmp_path, url_list, "download.incremental_mode=overwrite"))
    assert not (images / "00000_stats.json").exists()
    assert summary.skipped_done == 0 and summary.rejected == {REASON_SHARD_FAILED: 3}


@pytest.mark.cluster
def test_ray_distributor_on_a_two_node_cluster(ray_cluster, served, tmp_path):
    """`download.distributor=ray` through the CLI, on a cluster started with `ray start`."""
    import os
    import subprocess
    import sys

    root, records, base = served
    photos = [r for r in records if r.kind == "photo"]
    url_list = write_url_list(photos, base, tmp_path / "urls.parquet", extra_urls={"missing/x.jpg": "gone"})
    sets = [
        f"project.data_root={tmp_path / 'data'}",
        f"download.input={url_list}",
        "download.distributor=ray",
        "download.number_sample_per_shard=3",
        "download.thread_count=2",
        f"download.timeout={TIMEOUT}",
        *ray_cluster.ray_overrides(),
    ]
    cmd = [sys.executable, "-m", "paradiffusion", "download", "--config", os.devnull]
    for s in sets:
        cmd += ["--set", s]
    repo = Path(__file__).resolve().parents[2]
    env = {**ray_cluster.env, "PYTHONPATH": str(repo)}
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "data" / "images" / "_summary.json").read_text())
    assert f"Ray cluster at {ray_cluster.address} (2 node(s)" in summary["ran_on"]
    assert (summary["in"], summary["out"], summary["rejected"]) == (len(photos) + 1, len(photos), {"http_404": 1})
    assert len(read_rows(tmp_path / "data" / "images")) == len(photos) + 1


def test_default_path_download_then_filter_gives_every_broken_kind_its_reason(served, tmp_path):
    """The default config end to end: download stores the bytes, the filter's decode judges them."""
    from curation.filter import run_filter
    from paradiffusion.storage import Table
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    root, records, base = served
    url_list = write_url_list(
        records, base, tmp_path / "urls.parquet", extra_urls={p: c for p, (c, _) in EXTRAS.items()}
    )
    run_download(cfg_for(tmp_path, url_list))  # only the input, output and a small worker pool are set
    tiny = build_tiny_clip(tmp_path / "models")
    cfg = load_config(
        [],
        [
            f"project.data_root={tmp_path / 'data'}",
            "filter.runner=local",  # the runner does not change a decision (test_filter_stage compares them)
            f"filter.models.clip_model={tiny['clip_model']}",
            f"filter.models.aesthetic={tiny['aesthetic']}",
        ],
    )
    assert run_filter(cfg) == 0
    rows = {r["url"]: r for r in Table(str(tmp_path / "data" / "scores")).read().to_pylist()}
    assert len(rows) == len(records) + len(EXTRAS)
    broken = {"decode_error", "decompression_bomb", "animated"}
    kinds = {r.expect for r in records if r.expect in broken}
    assert kinds == broken
    for rec in records:
        row = rows[f"{base}/images/{rec.name}"]
        if rec.expect in broken:
            assert row["reject_reason"] == rec.expect, (rec.name, row["reject_reason"], row["reject_detail"])
            assert "\n" not in row["reject_detail"]
        if rec.expect == "decompression_bomb":
            assert "30000x30000" in row["reject_detail"] and (row["width"], row["height"]) == (30000, 30000)
    for path, (_, reason) in EXTRAS.items():
        row = rows[f"{base}/{path}"]
        if reason == "not_an_image":  # an HTML answer is stored as it came; the decode says what it is
            assert row["reject_reason"] == "decode_error" and "HTML" in row["reject_detail"]
            continue
        assert row["reject_reason"] == "download_failed" and row["reject_detail"].startswith(reason + ": ")
        assert "\n" not in row["reject_detail"] and len(row["reject_detail"]) < 200


def test_changed_row_settings_are_refused_on_a_finished_folder(served, tmp_path):
    root, records, base = served
    url_list = write_url_list(records[:2], base, tmp_path / "urls.parquet")
    run_download(cfg_for(tmp_path, url_list))
    before = (tmp_path / "data" / "images" / "_config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"download.disable_all_reencoding True -> False.*overwrite"):
        run_download(cfg_for(tmp_path, url_list, "download.disable_all_reencoding=false"))
    assert (tmp_path / "data" / "images" / "_config.yaml").read_text() == before  # still true of the rows
    run_download(cfg_for(tmp_path, url_list, "download.thread_count=2"))  # how fast, not what: allowed
