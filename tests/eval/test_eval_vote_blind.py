"""Blind for any images: what a voter receives predicts the model no better than chance.

Two "models" whose files differ in every way but the scene: ``pngmodel`` writes 192x120
PNGs with text, ``eXIf`` and ``tIME`` chunks; ``jpgmodel`` writes 120x192 JPEGs (other
format, size and aspect) with EXIF (Software, Artist), a comment and an ICC profile.
Both draw the same smooth scene per prompt (the portrait one in its middle band, the
part a centre crop keeps). 100 pairs go through the real app; every response of the
voter's image route is checked: one header set and one JPEG header for all, no
metadata, and a cross-validated logistic regression on the response features stays at
chance.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin
from starlette.testclient import TestClient

from eval.schemas import EVAL_IMAGES
from eval.vote.app import create_app
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs
from paradiffusion.storage import Table, rows_to_table

N_PAIRS = 100
STUDY = (64, 40)  # the study size: landscape 1.6
MODELS = {"pngmodel": (192, 120), "jpgmodel": (120, 192)}


def _scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth scene (gradient + blurred shapes) whose complexity varies with the seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.integers(0, 255, 3)
    tilt = rng.uniform(-120, 120, (2, 3))
    arr = np.clip(base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1], 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 14))):
        x0, y0 = rng.uniform(0, 1, 2) * (w, h)
        r = rng.uniform(0.05, 0.3) * w
        draw.ellipse((x0 - r, y0 - r * 0.7, x0 + r, y0 + r * 0.7), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im.filter(ImageFilter.GaussianBlur(2))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png(im: Image.Image, path: Path, seed: int) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"pngmodel, seed {seed}, steps 50")
    exif = Image.Exif()
    exif[0x0131] = "pngmodel 1.0"
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info, exif=exif)
    data = buf.getvalue()
    ihdr_end = 8 + 25  # signature + the IHDR chunk
    t = _png_chunk(b"tIME", struct.pack(">HBBBBB", 2024, 5, 1 + seed % 28, 12, 0, seed % 60))
    path.write_bytes(data[:ihdr_end] + t + data[ihdr_end:])


def _write_jpeg(im: Image.Image, path: Path, seed: int) -> None:
    exif = Image.Exif()
    exif[0x0131] = "jpgmodel pipeline"  # Software
    exif[0x013B] = "jpg lab"  # Artist
    im.save(path, format="JPEG", quality=95, exif=exif, comment=f"seed {seed}".encode(), icc_profile=b"\0" * 300)


def _make_study(root: Path, n_pairs: int) -> Table:
    rows = []
    for p in range(n_pairs):
        scene = _scene(p, MODELS["pngmodel"])
        for model, (w, h) in MODELS.items():
            if model == "pngmodel":
                im, ext = scene, "png"
            else:  # portrait: the scene in the middle band (what the centre crop keeps), other content around it
                im = _scene(10_000 + p, (w, h))
                band = scene.resize((w, round(w * 120 / 192)), Image.Resampling.LANCZOS)
                im.paste(band, (0, (h - band.height) // 2))
                ext = "jpg"
            rel = f"{model}/p{p}.{ext}"
            (root / model).mkdir(parents=True, exist_ok=True)
            (_write_png if ext == "png" else _write_jpeg)(im, root / rel, p)
            rows.append(
                {
                    "key": f"{model}/s/p{p}/0",
                    "model": model,
                    "prompt_set": "s",
                    "prompt_id": f"p{p}",
                    "category": None,
                    "prompt": f"scene {p}",
                    "seed": 0,
                    "image_path": rel,
                    "width": w,
                    "height": h,
                    "settings": json.dumps({}),
                    "seconds": 0.0,
                    "error": None,
                }
            )
    table = Table(str(root), schema=EVAL_IMAGES)
    table.write_shard("all", rows_to_table(rows, EVAL_IMAGES))
    return table


def _cv_logistic_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Accuracy of an L2 logistic regression under k-fold cross-validation.

    A few lines of numpy (gradient descent on standardised features) rather than
    scikit-learn, which the project does not depend on.
    """
    order = np.random.default_rng(seed).permutation(len(y))
    correct = 0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        mu, sd = x[train].mean(0), x[train].std(0)
        sd[sd == 0] = 1.0
        xt = np.c_[np.ones(len(train)), (x[train] - mu) / sd]
        w = np.zeros(xt.shape[1])
        for _ in range(2000):
            p = 1 / (1 + np.exp(-xt @ w))
            w -= 0.5 * (xt.T @ (p - y[train]) / len(train) + 1e-3 * w)
        xs = np.c_[np.ones(len(test)), (x[test] - mu) / sd]
        correct += int(((xs @ w > 0).astype(int) == y[test]).sum())
    return correct / len(y)


def _jpeg_header(data: bytes) -> bytes:
    """The bytes before the scan data (markers, tables, frame header)."""
    return data[: data.index(b"\xff\xda")]


def _responses(root: Path, n_pairs: int) -> list:
    """(model, response) for both images of ``n_pairs`` pairs, as voters' browsers get them
    (one voter per pair: voting is not what is tested here)."""
    table = _make_study(root / "images", n_pairs)
    built = build_pairs(table.read(), size=STUDY, equalise="crop")
    assert len(built.rows) == n_pairs
    store = VoteStore(root / "votes.sqlite", quota=1)
    store.add_pairs(built.rows)
    out = []
    with TestClient(create_app(store, root / "images", size=STUDY)) as client:
        for i in range(n_pairs):
            token = store.add_voter(f"v{i}")
            h = {"X-Token": token}
            pid = client.get("/api/next", headers=h).json()["pair_id"]
            sides = store.served_sides(store.voter_for(token).id, pid)
            for side, model in zip("AB", sides, strict=True):
                r = client.get(f"/image/{pid}/{side}", headers=h)
                assert r.status_code == 200
                out.append((model, r))
    assert len(out) == 2 * n_pairs and {m for m, _ in out} == set(MODELS)
    return out


@pytest.fixture(scope="module")
def responses(tmp_path_factory):
    return _responses(tmp_path_factory.mktemp("study"), 12)


@pytest.fixture(scope="module")
def responses_100(tmp_path_factory):
    return _responses(tmp_path_factory.mktemp("study100"), N_PAIRS)


def _check_headers_and_files(responses) -> None:
    header_sets = {tuple(sorted((k, v) for k, v in r.headers.items() if k != "content-length")) for _, r in responses}
    assert len(header_sets) == 1  # one header set (names and values) for both models
    assert dict(next(iter(header_sets)))["content-type"] == "image/jpeg"
    assert len({_jpeg_header(r.content) for _, r in responses}) == 1  # one encoder, quality, tables, size
    for model, r in responses:
        im = Image.open(io.BytesIO(r.content))
        assert im.format == "JPEG" and im.size == STUDY and im.mode == "RGB"
        assert not im.getexif() and "icc_profile" not in im.info and "comment" not in im.info
        for marker in (b"Exif", b"ICC_PROFILE", b"tEXt", b"tIME", b"eXIf", b"seed", b"model", b"jpg lab"):
            assert marker not in r.content, (model, marker)


def test_headers_and_file_structure_name_no_model(responses):
    _check_headers_and_files(responses)


@pytest.mark.slow  # 100 pairs: about 25 s on a 2-core shared CPU
def test_no_response_feature_predicts_the_model(responses_100):
    """Over 100 pairs: the exact checks above hold, and features a script could read off
    each response (its length, the number and size of its headers, the JPEG header
    length, the image size) classify the model at chance."""
    responses = responses_100
    _check_headers_and_files(responses)
    x = np.array(
        [
            [
                len(r.content),
                int(r.headers["content-length"]),
                len(r.headers),
                sum(len(k) + len(v) for k, v in r.headers.items()),
                len(_jpeg_header(r.content)),
                *Image.open(io.BytesIO(r.content)).size,
            ]
            for _, r in responses
        ],
        dtype=float,
    )
    y = np.array([m == "pngmodel" for m, _ in responses], dtype=int)
    acc = _cv_logistic_accuracy(x, y)
    # chance is 0.5; over 200 responses its spread is about 0.035, so 0.62 is over three of them
    assert acc < 0.62, acc
    # the classifier does find a signal when there is one: given a noisy copy of the label, it is right
    assert _cv_logistic_accuracy(np.c_[x, y + np.random.default_rng(1).normal(0, 0.3, len(y))], y) > 0.9
