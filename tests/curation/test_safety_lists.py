"""Denylists and opt-out lists: formats, normalisation, matching, and the errors a bad list gives."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import ListConfig, OptOutListConfig
from curation.safety import REJECT_DENYLISTED, REJECT_OPTED_OUT
from curation.safety.lists import load_list, load_lists, normalise_url
from paradiffusion.config import ConfigError


@pytest.mark.parametrize(
    "a, b",
    [
        ("http://Example.COM/a.jpg", "https://www.example.com/a.jpg"),
        ("https://example.com:443/a.jpg#frag", "http://example.com/a.jpg"),
        ("https://example.com/%7Euser/a%2fb.jpg", "https://example.com/~user/a%2Fb.jpg"),
        (" https://example.com ", "https://example.com/"),
    ],
)
def test_urls_that_name_the_same_image_normalise_the_same(a, b):
    assert normalise_url(a) == normalise_url(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("https://example.com/a.jpg", "https://example.com/A.jpg"),  # paths are case-sensitive
        ("https://example.com:8080/a.jpg", "https://example.com/a.jpg"),
        ("https://example.com/a.jpg?x=1", "https://example.com/a.jpg?x=2"),
        ("https://example.com/a%2Fb.jpg", "https://example.com/a/b.jpg"),  # an escaped slash is not a slash
    ],
)
def test_different_urls_stay_different(a, b):
    assert normalise_url(a) != normalise_url(b)


def test_every_file_format_and_kind(tmp_path):
    data = b"not really an image, only bytes"
    md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    (tmp_path / "urls.txt").write_text("# a comment\n\nhttps://www.bad.example/x.jpg\n")
    (tmp_path / "hashes.csv").write_text(f"id,sha256\n1,{sha.upper()}\n")
    pq.write_table(pa.table({"md5": [md5]}), tmp_path / "md5.parquet")
    (tmp_path / "domains.txt").write_text("optout.example\n")
    lists = load_lists(
        [
            ListConfig(name="urls", path=str(tmp_path / "urls.txt"), kind="url"),
            ListConfig(name="sha", path=str(tmp_path / "hashes.csv"), kind="sha256"),
            ListConfig(name="md5s", path=str(tmp_path / "md5.parquet"), kind="md5"),
        ],
        [OptOutListConfig(name="asked", path=str(tmp_path / "domains.txt"), kind="domain")],
    )
    assert lists.check_url("http://bad.example/x.jpg") == (REJECT_DENYLISTED, "urls (url)")
    assert lists.check_url("http://bad.example/y.jpg") is None
    assert lists.check_url("https://cdn.optout.example/a.png") == (REJECT_OPTED_OUT, "asked (domain)")
    assert lists.check_url("https://notoptout.example/a.png") is None
    assert lists.check_bytes(data) == (REJECT_DENYLISTED, "sha (sha256)")
    assert lists.check_bytes(data + b"!") is None
    only_md5 = load_lists([ListConfig(name="md5s", path=str(tmp_path / "md5.parquet"), kind="md5")])
    assert only_md5.check_bytes(data) == (REJECT_DENYLISTED, "md5s (md5)")
    assert "urls: 1 url" in lists.describe()


def test_a_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "h.txt"
    f.write_text("# sha256 list\n" + "a" * 64 + "\nnot-a-hash\n")
    with pytest.raises(ConfigError, match=rf"{f}:3: 'not-a-hash' is not a hex sha256 hash"):
        load_list("h", str(f), "sha256")
    u = tmp_path / "u.txt"
    u.write_text("https://ok.example/a.jpg\nno url here\n")
    with pytest.raises(ConfigError, match=rf"{u}:2: .* is not a URL"):
        load_list("u", str(u), "url")


def test_a_hash_of_another_form_is_refused_with_the_form_expected(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("md5\n" + hashlib.sha256(b"x").hexdigest() + "\n")
    with pytest.raises(ConfigError, match=r"h.csv:2: a SHA-256 digest or PDQ hash in a list of kind 'md5'.*32 hex"):
        load_list("h", str(f), "md5")
    g = tmp_path / "g.txt"
    g.write_text(hashlib.md5(b"x").hexdigest() + "\n")
    with pytest.raises(ConfigError, match=r"g.txt:1: an MD5 digest in a list of kind 'sha256'.*64 hex"):
        load_list("g", str(g), "sha256")


def test_an_unreadable_list_stops_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt: cannot read this list"):
        load_list("x", str(tmp_path / "nope.txt"), "url")
    with pytest.raises(ConfigError, match="used twice"):
        (tmp_path / "a.txt").write_text("")
        cfg = ListConfig(name="a", path=str(tmp_path / "a.txt"), kind="url")
        load_lists([cfg, cfg])


def test_thresholds_outside_0_1_are_config_errors_naming_the_key():
    from pipelines.config import load_config

    with pytest.raises(ConfigError, match="punsafe_max"):
        load_config([], ["download.punsafe_max=1.5"])
    with pytest.raises(ConfigError, match="nsfw_max"):
        load_config([], ["filter.thresholds.nsfw_max=-0.1"])
    with pytest.raises(ConfigError, match="kind"):
        load_config([], ['download.denylists=[{"name": "a", "path": "a.txt", "kind": "sha1"}]'])


def test_pdq_lists_match_within_the_hamming_distance(tmp_path):
    from curation.safety.lists import _min_hamming

    base = bytes(range(32))
    near = bytearray(base)
    near[0] ^= 0b111  # 3 bits away
    (tmp_path / "p.txt").write_text(base.hex() + "\n" + ("ff" * 32) + "\n")
    lst = load_list("p", str(tmp_path / "p.txt"), "pdq", max_distance=3)
    assert len(lst) == 2
    assert _min_hamming(bytes(near), lst.pdq) == 3
    assert _min_hamming(bytes(32), lst.pdq) == sum(bin(b).count("1") for b in base)
    (tmp_path / "bad.txt").write_text(hashlib.md5(b"x").hexdigest() + "\n")
    with pytest.raises(ConfigError, match="bad.txt:1: an MD5 digest in a list of kind 'pdq'"):
        load_list("bad", str(tmp_path / "bad.txt"), "pdq")


# PDQ hashes, as hex, of photographs bundled with scikit-image (decoded as they are: all are
# 512 px or less, so the reference tool does not downsample them), printed by Meta's reference
# tool `pdq-photo-hasher` (ThreatExchange pdq/cpp, BSD licence, as vendored in the pdqhash 0.2.8
# sdist) built with g++ from that sdist and run on each photo saved as PPM. Hash-sharing
# programmes publish PDQ in this hex form, so matching it proves the bit order and packing.
PDQ_REFERENCE_HEX = {
    "astronaut.png": "2d6b1af3a956c529e79ca3d2526fa834d4196c81cedd04de0a26b855fc99b724",
    "chelsea.png": "5feb5321f01da156898e2bf629a5d3438412cdbd23f48942464526315db33ffd",
    "color.png": "94939c2c53c7530c4a93f5b42ad6ae3cab4b38c64516c5f4549b9d98aaeb3363",
}


def _photo_bytes(name: str) -> bytes:
    from paradiffusion.testing.sample import _photo_path

    return _photo_path(name).read_bytes()


def _recoded(data: bytes, scale: float, quality: int) -> bytes:
    """The image resized by ``scale`` and re-encoded as JPEG: a web copy of it."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        small = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(PDQ_REFERENCE_HEX))
def test_pdq_of_image_bytes_equals_the_reference_tool(name):
    pytest.importorskip("pdqhash", reason="pdqhash (the curation extra) builds from source; not installed here")
    from curation.safety.lists import pdq_hash

    assert pdq_hash(_photo_bytes(name)).hex() == PDQ_REFERENCE_HEX[name]


def test_a_pdq_denylist_catches_resized_recoded_copies_and_not_other_images(tmp_path):
    pytest.importorskip("pdqhash", reason="pdqhash (the curation extra) builds from source; not installed here")
    from curation.safety.lists import pdq_hash
    from paradiffusion.testing.sample import PHOTOS

    listed = ["astronaut.png", "chelsea.png"]
    (tmp_path / "pdq.csv").write_text("pdq,note\n" + "".join(f"{pdq_hash(_photo_bytes(n)).hex()},x\n" for n in listed))
    lists = load_lists([ListConfig(name="known", path=str(tmp_path / "pdq.csv"), kind="pdq", max_distance=31)])
    for name in listed:
        for scale, quality in ((1.0, 90), (0.6, 60), (0.35, 75)):
            copy = _recoded(_photo_bytes(name), scale, quality)
            assert copy != _photo_bytes(name)
            hit = lists.check_bytes(copy)
            assert hit is not None and hit[0] == REJECT_DENYLISTED, (name, scale, quality, hit)
            distance = int(hit[1].removeprefix("known (pdq, distance ").removesuffix(")"))
            assert 0 <= distance <= 31, hit
    for other in sorted(set(PHOTOS) - set(listed)):  # unrelated photos: ~half the 256 bits differ
        assert lists.check_bytes(_photo_bytes(other)) is None, other
        assert lists.check_bytes(_recoded(_photo_bytes(other), 0.6, 60)) is None, other
    # the threshold is what decides: at distance 0 only the exact image matches
    exact = load_lists([ListConfig(name="exact", path=str(tmp_path / "pdq.csv"), kind="pdq", max_distance=0)])
    assert exact.check_bytes(_photo_bytes("astronaut.png")) == (REJECT_DENYLISTED, "exact (pdq, distance 0)")
    assert exact.check_bytes(_recoded(_photo_bytes("astronaut.png"), 0.6, 60)) is None
    assert lists.check_bytes(b"not an image at all") is None  # undecodable: the decode step reports it


def test_the_gpu_overlay_turns_the_watermark_model_on():
    from pathlib import Path

    from pipelines.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cpu = load_config([str(repo / "pipelines.yaml")], [])
    gpu = load_config([str(repo / "pipelines.yaml"), str(repo / "configs" / "filter_gpu.yaml")], [])
    assert cpu.filter.models.watermark is None
    assert gpu.filter.models.watermark.endswith("/watermark_model_v1.pt") and gpu.filter.thresholds.watermark_max == 0.5
