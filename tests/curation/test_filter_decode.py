"""Decoding every kind of image the bundled sample has, against each record's `expect`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation.decode import REJECT_ANIMATED, REJECT_BOMB, decode_image, resize_center_crop
from paradiffusion.schemas import REJECT_DECODE
from paradiffusion.testing.sample import build_sample

DECODE_REASONS = {REJECT_DECODE, REJECT_BOMB, REJECT_ANIMATED}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    records = build_sample(out)
    return {r.name: (r, (out / "images" / r.name).read_bytes()) for r in records}


def test_every_sample_record_decodes_as_expected(sample):
    for name, (rec, data) in sample.items():
        d = decode_image(data)
        if rec.expect in DECODE_REASONS:
            assert d.reason == rec.expect, (name, d.reason, d.detail)
            assert d.image is None and d.detail
        else:
            assert d.reason is None, (name, d.reason, d.detail)
            assert d.image.mode == "RGB" and d.image.size == (d.width, d.height), name
            assert d.pixel_hash is not None
        assert len(d.sha256) == 64


def test_special_images_are_converted_correctly(sample):
    exif = decode_image(sample["exif_rotated.jpg"][1])
    assert (exif.width, exif.height) == (300, 400)  # stored 400x300, displays rotated
    gray16 = np.asarray(decode_image(sample["gray16.png"][1]).image)
    assert 20 < gray16.mean() < 235  # not clipped to white by a naive 16-bit convert
    assert (gray16[..., 0] == gray16[..., 1]).all()
    rgba = decode_image(sample["rgba.png"][1]).image
    base = decode_image(sample["palette.png"][1]).image
    assert np.asarray(rgba).mean() > np.asarray(base).mean() + 30  # half-transparent on white is lighter
    cmyk = decode_image(sample["cmyk.jpg"][1]).image
    assert cmyk.mode == "RGB" and abs(np.asarray(cmyk).mean() - np.asarray(base).mean()) < 25


def test_animated_first_frame_policy(sample):
    d = decode_image(sample["animated.gif"][1], animated="first_frame")
    assert d.reason is None and d.image.size == (320, 240)


def test_max_pixels_is_checked_from_the_header_with_the_size(sample):
    d = decode_image(sample["astronaut.jpg"][1], max_pixels=100_000)
    assert d.reason == REJECT_BOMB and (d.width, d.height) == (512, 512) and "max_pixels" in d.detail


def test_reduced_jpeg_decode_keeps_original_size(sample):
    data = sample["retina.jpg"][1]
    full, small = decode_image(data), decode_image(data, draft_size=64)
    assert (small.width, small.height) == (full.width, full.height) == (1411, 1411)
    assert small.reduced > 1 and min(small.image.size) >= 64 and small.image.size[0] < full.image.size[0]
    png = io.BytesIO()
    full.image.save(png, "PNG")
    assert decode_image(png.getvalue(), draft_size=64).reduced == 1  # only JPEGs are drafted


def test_exact_duplicate_hashes(sample):
    a, b = decode_image(sample["chelsea.jpg"][1]), decode_image(sample["chelsea_copy.jpg"][1])
    assert a.sha256 == b.sha256
    c, d = decode_image(sample["coffee.jpg"][1]), decode_image(sample["coffee_same_pixels.png"][1])
    assert c.sha256 != d.sha256 and c.pixel_hash == d.pixel_hash
    assert a.pixel_hash != c.pixel_hash


def test_resize_center_crop_matches_open_clip_geometry():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 600, 3), dtype=np.uint8))
    arr = resize_center_crop(img, 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_bomb_details_carry_the_size(sample):
    for name in ("bomb.png", "bomb.gif", "bomb.jpg"):
        d = decode_image(sample[name][1])
        assert d.reason == REJECT_BOMB and "30000x30000" in d.detail and (d.width, d.height) == (30000, 30000)


def test_header_size_agrees_with_pillow(sample):
    from curation.decode import header_size

    checked = set()
    for name, (rec, data) in sample.items():
        if rec.kind == "broken" or not data:
            continue
        assert header_size(data) == Image.open(io.BytesIO(data)).size, name
        checked.add(Image.open(io.BytesIO(data)).format)
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    for kw in ({"lossless": True}, {"quality": 80}):  # VP8L and VP8 WebP
        buf = io.BytesIO()
        base.save(buf, "WEBP", **kw)
        assert header_size(buf.getvalue()) == (53, 37)
    assert {"JPEG", "PNG", "GIF", "WEBP"} <= checked


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_max_pixels_above_pillows_own_limit_is_honoured_under_threads(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    # Pillow's limit scaled down (errors above 2 x 1,000 pixels) so that images a test can
    # afford are "bombs" to Pillow: max_pixels above it must still decide.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small, big = _png(20, 20), _png(120, 100)  # 400 and 12,000 pixels
    assert decode_image(big, max_pixels=20_000).reason is None
    d = decode_image(big, max_pixels=5_000)
    assert d.reason == REJECT_BOMB and "120x100" in d.detail
    gif = io.BytesIO()
    frames = [Image.new("RGB", (120, 100), (i * 40, 0, 0)) for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    jobs = [(big, 20_000, "reject"), (small, 5_000, "reject"), (gif.getvalue(), 20_000, "first_frame")] * 40

    def run(job):
        data, limit, animated = job
        return decode_image(data, max_pixels=limit, animated=animated).reason

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(run, jobs))
    assert reasons == [None] * len(jobs)
    assert Image.MAX_IMAGE_PIXELS == 1000  # put back when the last decode ended
