"""Build the bundled sample: real photographs, synthetic images and broken files.

``build_sample(out)`` writes ``out/images/<name>`` and ``out/sample.jsonl`` (one
record per file: name, alt text, kind, and what a correct filter should say about
it). ``write_url_list`` turns it into a URL list in any of the formats the download
stage reads, pointing at a base URL (the local HTTP server in tests and the demo).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Photographs bundled inside scikit-image's wheel (no download needed).
PHOTOS = {
    "astronaut.png": "A portrait of an astronaut in a white spacesuit holding a helmet, with an American flag behind.",
    "chelsea.png": "A ginger tabby cat looking to the side, resting on a wooden floor.",
    "coffee.png": "A cup of coffee with latte art on a saucer, seen from above on a wooden table.",
    "rocket.jpg": "A rocket standing on the launch pad before lift-off under a clear sky.",
    "motorcycle_left.png": "A red motorcycle parked in a room, photographed from the side.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies scattered across the dark sky in a deep field image.",
    "retina.jpg": "A photograph of the back of a human eye showing blood vessels on the retina.",
    "color.png": "A colourful chart of hue bands arranged in a circle on a white background.",
}

NON_ENGLISH = [
    "Eine rote Katze schläft auf einem sonnigen Fensterbrett neben einer Pflanze.",
    "一只橘色的猫躺在阳光下的窗台上，旁边有一盆绿色植物。",
    "Un chat roux dort sur le rebord d'une fenêtre ensoleillée à côté d'une plante.",
]

ENGLISH = [
    "A quiet mountain lake at sunrise with pine trees reflected in the still water.",
    "A bowl of fresh fruit with apples, oranges and grapes on a kitchen counter.",
    "A city street at night with neon signs, wet pavement and people walking.",
    "A small wooden boat tied to a pier on a calm blue sea under white clouds.",
    "A field of yellow sunflowers under a bright summer sky with a farmhouse behind.",
    "A snowy forest path between tall trees with soft light falling through branches.",
]


@dataclass
class SampleRecord:
    name: str  # file name under images/ (or the URL path for served-only cases)
    caption: str
    kind: str  # photo | synthetic | broken | special
    expect: str  # "ok" or the reject reason a correct filter gives
    note: str = ""


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def synthetic_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth gradient with a few shapes: compresses like a photo, not like noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, size=(3, 3))
    arr = np.stack([(c[i, 0] * x / w + c[i, 1] * y / h + c[i, 2]) % 1.0 for i in range(3)], axis=-1)
    img = Image.fromarray((arr * 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
        x1, y1 = (
            min(w - 1, x0 + int(rng.integers(8, max(9, w // 2)))),
            min(h - 1, y0 + int(rng.integers(8, max(9, h // 2)))),
        )
        d.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def _png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif_with_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen is ``width x height`` with one 1x1 frame: a bomb for a decoder
    that allocates the whole screen."""
    tiny = io.BytesIO()
    Image.new("P", (1, 1)).save(tiny, "GIF")
    data = bytearray(tiny.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _jpeg_with_header_only(width: int, height: int) -> bytes:
    """A small JPEG whose start-of-frame claims ``width x height`` (the data is for 8x8)."""
    data = bytearray(_jpeg(Image.new("RGB", (8, 8), (200, 100, 50))))
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk the segments to the start of frame
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _animated(frames: list[Image.Image], fmt: str) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _photo_path(name: str) -> Path:
    import skimage  # the dev extra brings it; the demo and tests use it

    return Path(os.path.dirname(skimage.__file__)) / "data" / name


def build_sample(
    out: str | os.PathLike, n_synthetic: int = 24, seed: int = 0, broken: bool = True
) -> list[SampleRecord]:
    """Write the sample into ``out/images`` and ``out/sample.jsonl``; returns the records."""
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records: list[SampleRecord] = []

    def add(name: str, data: bytes, caption: str, kind: str, expect: str, note: str = "") -> None:
        (img_dir / name).write_bytes(data)
        records.append(SampleRecord(name, caption, kind, expect, note))

    # Real photographs, re-encoded as JPEG (RGB) so they look like web downloads.
    for name, caption in PHOTOS.items():
        img = Image.open(_photo_path(name)).convert("RGB")
        add(Path(name).stem + ".jpg", _jpeg(img), caption, "photo", "ok")

    # Synthetic images of many sizes and aspect ratios.
    sizes = [(640, 480), (480, 640), (800, 800), (1024, 576), (300, 200), (96, 96), (1200, 300), (512, 384)]
    for i in range(n_synthetic):
        w, h = sizes[i % len(sizes)]
        caption = ENGLISH[i % len(ENGLISH)]
        expect = "ok"
        if min(w, h) < 128:
            expect = "too_small"
        elif max(w, h) / min(w, h) > 3.0:
            expect = "aspect_ratio"
        if i % 8 == 3:
            caption = NON_ENGLISH[(i // 8) % len(NON_ENGLISH)]
            expect = "language" if expect == "ok" else expect
        if i % 8 == 7:
            caption = ""
            expect = "caption_too_short" if expect == "ok" else expect
        add(f"synthetic_{i:03d}.jpg", _jpeg(synthetic_image(rng, w, h)), caption, "synthetic", expect, f"{w}x{h}")

    # Exact duplicates: the same bytes, and the same pixels in another encoding.
    chelsea = (img_dir / "chelsea.jpg").read_bytes()
    add("chelsea_copy.jpg", chelsea, PHOTOS["chelsea.png"], "special", "duplicate", "same bytes as chelsea.jpg")
    coffee_px = Image.open(io.BytesIO((img_dir / "coffee.jpg").read_bytes())).convert("RGB")
    add(
        "coffee_same_pixels.png",
        _png(coffee_px),
        PHOTOS["coffee.png"],
        "special",
        "duplicate",
        "same pixels as coffee.jpg",
    )

    # Unusual but valid images: each must decode to RGB correctly.
    base = synthetic_image(rng, 400, 300)
    add("cmyk.jpg", _jpeg(base.convert("CMYK")), ENGLISH[0], "special", "ok", "CMYK JPEG")
    add(
        "palette.png",
        _png(base.convert("P", palette=Image.Palette.ADAPTIVE)),
        ENGLISH[1],
        "special",
        "ok",
        "palette PNG",
    )
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    add("gray16.png", _png(Image.fromarray(arr16)), ENGLISH[2], "special", "ok", "16-bit grayscale PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    add("rgba.png", _png(rgba), ENGLISH[3], "special", "ok", "RGBA PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    add(
        "exif_rotated.jpg",
        _jpeg(synthetic_image(rng, 400, 300), exif=exif.tobytes()),
        ENGLISH[4],
        "special",
        "ok",
        "stored 400x300, displays 300x400",
    )
    frames = [synthetic_image(rng, 320, 240) for _ in range(3)]
    add("animated.gif", _animated(frames, "GIF"), ENGLISH[5], "special", "animated", "3-frame GIF")
    add("animated.webp", _animated(frames, "WEBP"), ENGLISH[0], "special", "animated", "3-frame animated WebP")
    add("animated.png", _animated(frames, "PNG"), ENGLISH[1], "special", "animated", "3-frame APNG")

    if broken:
        good = _jpeg(synthetic_image(rng, 640, 480))
        add("truncated.jpg", good[: len(good) // 3], ENGLISH[0], "broken", "decode_error", "first third of a JPEG")
        add("zero.jpg", b"", ENGLISH[1], "broken", "decode_error", "zero bytes")
        add("garbage.jpg", rng.bytes(2048), ENGLISH[2], "broken", "decode_error", "random bytes")
        add(
            "page.jpg",
            b"<!doctype html><html><body>Not an image</body></html>",
            ENGLISH[3],
            "broken",
            "decode_error",
            "an HTML page saved as .jpg",
        )
        add(
            "bomb.png",
            _png_with_header_only(30000, 30000),
            ENGLISH[4],
            "broken",
            "decompression_bomb",
            "header claims 30000x30000",
        )
        add(
            "bomb.gif",
            _gif_with_header_only(30000, 30000),
            ENGLISH[5],
            "broken",
            "decompression_bomb",
            "GIF logical screen 30000x30000",
        )
        add(
            "bomb.jpg",
            _jpeg_with_header_only(30000, 30000),
            ENGLISH[0],
            "broken",
            "decompression_bomb",
            "JPEG start-of-frame claims 30000x30000",
        )

    with open(out / "sample.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    return records


def load_records(out: str | os.PathLike) -> list[SampleRecord]:
    with open(Path(out) / "sample.jsonl") as f:
        return [SampleRecord(**json.loads(line)) for line in f if line.strip()]


def write_url_list(
    records: list[SampleRecord],
    base_url: str,
    path: str | os.PathLike,
    fmt: str = "parquet",
    url_col: str = "url",
    caption_col: str = "caption",
    extra_urls: dict[str, str] | None = None,
) -> Path:
    """Write a URL list (parquet, csv, tsv or jsonl) for ``records`` served at ``base_url``.

    ``extra_urls`` adds rows that point at server paths with no file (404s, slow,
    non-image responses), mapped to their alt text.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = [{url_col: f"{base_url.rstrip('/')}/images/{r.name}", caption_col: r.caption} for r in records]
    for url_path, caption in (extra_urls or {}).items():
        rows.append({url_col: f"{base_url.rstrip('/')}/{url_path.lstrip('/')}", caption_col: caption})
    table = pa.Table.from_pylist(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt in ("csv", "tsv"):
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="," if fmt == "csv" else "\t"))
    elif fmt == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"fmt must be parquet, csv, tsv or jsonl, got {fmt!r}")
    return path
