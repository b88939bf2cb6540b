"""Safety at download and at filter, against a local HTTP server serving the bundled sample.

Rows that must not be fetched point at a port where nothing listens: fetched, they
would fail as ``connection_refused``; refused before the request, they carry their
safety reason. A served image whose SHA-256 is on a denylist, and a resized, re-encoded
copy of an image whose PDQ hash is on one, must leave no trace of their bytes in any file
the run writes.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.download import failure_reason, run_download
from curation.safety.lists import pdq_hash
from paradiffusion.testing.http import serve_folder
from paradiffusion.testing.sample import build_sample
from pipelines.config import load_config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    records = build_sample(root / "sample", n_synthetic=4, broken=False)
    with serve_folder(str(root / "sample")) as base_url:
        yield root, records, base_url


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _every_file_holds(folder: Path, data: bytes) -> list[str]:
    """Files under ``folder`` holding ``data``: a parquet file in a binary cell (its pages are
    compressed), any other file as a 1 kB piece of its raw bytes."""
    piece = data[200:1224]
    out = []
    for p in glob.glob(str(folder / "**" / "*"), recursive=True):
        if not Path(p).is_file():
            continue
        if p.endswith(".parquet"):
            t = pq.read_table(p)
            cells = [v for c in t.column_names if pa.types.is_binary(t[c].type) for v in t[c].to_pylist()]
            if any(v is not None and piece in v for v in cells):
                out.append(p)
        elif piece in Path(p).read_bytes():
            out.append(p)
    return out


def _recoded(path: Path) -> bytes:
    import io

    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").resize((im.width * 3 // 5, im.height * 3 // 5), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=60)
    return buf.getvalue()


@pytest.mark.slow
def test_listed_and_unsafe_rows_are_never_fetched_and_denylisted_bytes_never_written(served, tmp_path):
    root, records, base = served
    photos = [r for r in records if r.kind == "photo"]
    ok, hashed, known = photos[0], photos[1], photos[2]
    dead = f"http://127.0.0.1:{_dead_port()}/images"
    # A web copy of a known image (smaller, re-encoded: other bytes, other MD5 / SHA-256), served;
    # the PDQ list holds the hash of the original only.
    web_copy = _recoded(root / "sample" / "images" / known.name)
    (root / "sample" / "images" / f"web_copy_of_{known.name}").write_bytes(web_copy)
    # url -> (caption, punsafe, pwatermark, expected reason)
    rows = {
        f"{base}/images/{ok.name}": ("a kept photo", 0.01, 0.02, None),
        f"{base}/images/{hashed.name}": ("a photo whose bytes are denylisted", 0.01, 0.02, "denylisted"),
        f"{base}/images/web_copy_of_{known.name}": ("a copy of a perceptually listed photo", 0.0, 0.0, "denylisted"),
        f"{dead}/listed.jpg": ("a denylisted url", 0.0, 0.0, "denylisted"),
        f"{dead}/asked-not.jpg": ("an opted-out url", 0.0, 0.0, "opted_out"),
        f"{dead}/unsafe.jpg": ("an unsafe row", 0.97, 0.0, "nsfw"),
        f"{dead}/marked.jpg": ("a watermarked row", 0.0, 0.93, "watermark"),
        f"{dead}/fetched.jpg": ("a row that is fetched", 0.0, 0.0, "connection_refused"),
    }
    url_list = tmp_path / "relaion.parquet"
    pq.write_table(
        pa.table(
            {
                "url": list(rows),
                "caption": [v[0] for v in rows.values()],
                "punsafe": [v[1] for v in rows.values()],
                "pwatermark": [v[2] for v in rows.values()],
            }
        ),
        url_list,
    )
    secret = (root / "sample" / "images" / hashed.name).read_bytes()
    (tmp_path / "urls.txt").write_text(f"# listed\n{dead.replace('http://', 'HTTPS://')}/listed.jpg#x\n")
    (tmp_path / "sha.csv").write_text(f"sha256\n{hashlib.sha256(secret).hexdigest()}\n")
    (tmp_path / "optout.txt").write_text(f"{dead}/asked-not.jpg\n")
    pdq_hex = pdq_hash((root / "sample" / "images" / known.name).read_bytes()).hex()
    (tmp_path / "pdq.txt").write_text(f"# PDQ, as hash-sharing programmes publish it\n{pdq_hex}\n")
    cfg = load_config(
        [],
        [
            f"project.data_root={tmp_path / 'data'}",
            f"download.input={url_list}",
            "download.processes_count=1",
            "download.thread_count=4",
            "download.timeout=4",
            f'download.denylists=[{{"name": "test-urls", "path": "{tmp_path / "urls.txt"}", "kind": "url"}}, '
            f'{{"name": "test-sha", "path": "{tmp_path / "sha.csv"}", "kind": "sha256"}}, '
            f'{{"name": "test-pdq", "path": "{tmp_path / "pdq.txt"}", "kind": "pdq", "max_distance": 31}}]',
            f'download.opt_outs=[{{"name": "asked", "path": "{tmp_path / "optout.txt"}", "kind": "url"}}]',
        ],
    )
    summary = run_download(cfg).to_dict()
    images = tmp_path / "data" / "images"
    got = pq.read_table(sorted(glob.glob(str(images / "*.parquet")))).to_pylist()
    reasons = {r["url"]: None if r["status"] == "success" else failure_reason(r["error_message"]) for r in got}
    assert reasons == {u: v[3] for u, v in rows.items()}
    by_url = {r["url"]: r for r in got}
    assert by_url[f"{base}/images/{hashed.name}"]["error_message"] == "denylisted: test-sha (sha256)"
    assert by_url[f"{dead}/listed.jpg"]["error_message"] == "denylisted: test-urls (url)"
    pdq_detail = by_url[f"{base}/images/web_copy_of_{known.name}"]["error_message"]
    assert pdq_detail.startswith("denylisted: test-pdq (pdq, distance ") and 0 < int(pdq_detail[36:-1]) <= 31
    assert by_url[f"{dead}/unsafe.jpg"]["punsafe"] == pytest.approx(0.97)  # the metadata is kept with the row
    want = collections.Counter(v[3] for v in rows.values() if v[3])
    assert summary["rejected"] == dict(want) and summary["out"] == 1
    # The denylisted image's bytes are nowhere: no shard, temp file, log or summary holds them.
    assert _every_file_holds(tmp_path / "data", secret) == []
    assert _every_file_holds(tmp_path / "data", web_copy) == []
    assert _every_file_holds(tmp_path / "data", (root / "sample" / "images" / ok.name).read_bytes())  # the check works

    # The filter carries each reason (not `download_failed`), and applies the lists itself.
    from curation.filter import run_filter
    from paradiffusion.storage import Table
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    tiny = build_tiny_clip(tmp_path / "models")
    fcfg = load_config(
        [],
        [
            f"project.data_root={tmp_path / 'data'}",
            "filter.runner=local",
            f"filter.models.clip_model={tiny['clip_model']}",
            f"filter.models.aesthetic={tiny['aesthetic']}",
            "filter.thresholds.aesthetic_min=null",
            "filter.thresholds.clip_score_min=null",
            "filter.thresholds.min_short_side=null",
            "filter.thresholds.languages=[]",
            # the kept photo is denylisted now: the filter finds it by the hash of its stored bytes
            f'download.denylists=[{{"name": "later", "path": "{tmp_path / "later.txt"}", "kind": "md5"}}]',
        ],
    )
    (tmp_path / "later.txt").write_text(hashlib.md5((root / "sample" / "images" / ok.name).read_bytes()).hexdigest())
    assert run_filter(fcfg) == 0
    scores = {r["url"]: r for r in Table(str(tmp_path / "data" / "scores")).read().to_pylist()}
    assert scores[f"{base}/images/{ok.name}"]["reject_reason"] == "denylisted"
    assert scores[f"{base}/images/{ok.name}"]["reject_detail"] == "later (md5)"
    for url, (_, _, _, reason) in rows.items():
        if reason and reason != "connection_refused":
            assert scores[url]["reject_reason"] == reason, url

    # A list that changed since the shards were measured: refused, naming the lists (the default)
    from paradiffusion.config import ConfigError

    (tmp_path / "later.txt").write_text(hashlib.md5(b"another image").hexdigest() + "\n")
    with pytest.raises(ConfigError, match=r"download.denylists/opt_outs"):
        run_filter(fcfg)


def test_refusals_decide_from_the_lists_then_the_metadata(tmp_path):
    from curation.config import ListConfig
    from curation.safety.hooks import refusals
    from curation.safety.lists import load_lists

    (tmp_path / "d.txt").write_text("bad.example\n")
    lists = load_lists([ListConfig(name="d", path=str(tmp_path / "d.txt"), kind="domain")])
    cols = {
        "url": ["https://img.bad.example/a.jpg", "https://ok.example/b.jpg", "https://ok.example/c.jpg", None],
        "punsafe": [0.99, 0.7, None, 0.0],
        "pwatermark": [0.0, 0.9, 0.2, 0.0],
    }
    limits = [("punsafe", 0.5, "nsfw"), ("pwatermark", 0.5, "watermark")]
    assert refusals(cols, lists, limits) == {0: "denylisted: d (domain)", 1: "nsfw: input punsafe 0.700 > 0.5"}
    assert refusals(cols, None, limits[1:]) == {1: "watermark: input pwatermark 0.900 > 0.5"}


def test_the_resizer_refuses_denylisted_bytes_before_decoding(tmp_path):
    import io

    from curation.config import ListConfig
    from curation.resize_guard import GuardedResizer
    from curation.safety.lists import load_lists

    data = (Path(__file__).parent / "test_safety_lists.py").read_bytes()  # any bytes: never decoded
    (tmp_path / "m.txt").write_text(hashlib.md5(data).hexdigest() + "\n")
    r = GuardedResizer(image_size=256, resize_mode="no", resize_only_if_bigger=True, disable_all_reencoding=True)
    r.safety = load_lists([ListConfig(name="m", path=str(tmp_path / "m.txt"), kind="md5")])
    assert r(io.BytesIO(data)) == (None, None, None, None, None, "denylisted: m (md5)")
    assert r(io.BytesIO(data + b"x"))[0] == data + b"x"  # stored as downloaded
