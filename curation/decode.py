"""Image bytes -> RGB pixels, or a reject reason. Never raises on bad input.

Web images come in every state: truncated, empty, HTML error pages saved as .jpg,
CMYK JPEGs, palette and 16-bit PNGs, transparency, EXIF-rotated photos, animations,
and headers claiming gigapixels (decompression bombs). :func:`decode_image` turns
each into either an RGB :class:`PIL.Image.Image` or one of the reasons below, with
a human-readable detail.

Size is measured on the original (after EXIF rotation) before anything is reduced;
``draft_size`` only changes how many pixels are decoded (JPEG DCT scaling, the
cheapest way to get a small image out of a large JPEG).

Decompression bombs are stopped before any pixel buffer exists: :func:`header_size`
reads width and height from the first bytes of PNG, GIF, WebP and JPEG files, and
every other format is measured by ``Image.open`` (header only) before ``load``.
Pillow has its own bomb check, a module global (``Image.MAX_IMAGE_PIXELS``, an error
above twice its value: 178,956,970 pixels by default); :func:`pillow_pixel_limit`
raises it for the duration of each decode so that ``max_pixels`` decides at any value,
and puts it back when no decode needs it (safe under threads: see there).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from paradiffusion.schemas import REJECT_DECODE

REJECT_BOMB = "decompression_bomb"
REJECT_ANIMATED = "animated"

_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


@dataclass
class Decoded:
    """What decoding one image gave: the RGB image (None when rejected) and measurements."""

    image: Image.Image | None
    width: int | None  # original size after EXIF rotation (also when decoded reduced)
    height: int | None
    sha256: str
    pixel_hash: str | None
    reason: str | None = None
    detail: str | None = None
    reduced: int = 1  # the JPEG draft scale that was used (1, 2, 4 or 8)


def one_line(text: object, limit: int = 160) -> str:
    """``text`` as one short line: whitespace runs (newlines too) become one space, cut at ``limit``."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------- header sizes
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments up to the first start-of-frame (which holds the size).
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    # RIFF container; the first chunk is VP8 (lossy), VP8L (lossless) or VP8X (extended:
    # the canvas size, which animated files use).
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height as stored in a PNG, GIF, WebP or JPEG header; None for other formats.

    Reads a few bytes, allocates nothing: the cheapest bomb check, and the one that runs
    before Pillow's WebP reader (which allocates its canvas when the file is opened).
    The size is the stored one (before EXIF rotation); the pixel count is the same.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
    except struct.error:  # too short: Pillow will say what is wrong with it
        return None
    return None


# --------------------------------------------------------------------------- Pillow's limit
# Pillow's bomb check reads the module global Image.MAX_IMAGE_PIXELS when a file is
# opened and again while some formats load (GIF frames, TIFF tiles, MPO). A decode that
# allows more pixels than Pillow's default must raise it for its whole duration, and
# threads decoding at once must not lower it under each other. So the global is set
# under a lock to max(Pillow's own value, every limit in flight) and restored to
# Pillow's value when the last decode ends. It is never lowered below Pillow's value
# (other code in the process keeps at least Pillow's protection); smaller limits are
# enforced by our own size check, which runs before anything is decoded.
_LIMIT_LOCK = threading.Lock()
_LIMITS_IN_FLIGHT: Counter = Counter()
_PILLOW_OWN: list = []  # Pillow's value while any limit is in flight


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let Pillow open and load images up to ``max_pixels`` pixels inside this block."""
    want = -(-int(max_pixels) // 2)  # Pillow errors above twice its global
    with _LIMIT_LOCK:
        if not _LIMITS_IN_FLIGHT:
            _PILLOW_OWN[:] = [Image.MAX_IMAGE_PIXELS]
        _LIMITS_IN_FLIGHT[want] += 1
        _set_pillow_limit()
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMITS_IN_FLIGHT[want] -= 1
            if not _LIMITS_IN_FLIGHT[want]:
                del _LIMITS_IN_FLIGHT[want]
            if _LIMITS_IN_FLIGHT:
                _set_pillow_limit()
            else:
                Image.MAX_IMAGE_PIXELS = _PILLOW_OWN.pop()


def _set_pillow_limit() -> None:
    own = _PILLOW_OWN[0]
    Image.MAX_IMAGE_PIXELS = None if own is None else max(own, *_LIMITS_IN_FLIGHT)


def _bomb_detail(w: int, h: int, max_pixels: int, where: str) -> str:
    return f"{w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,} ({where}, not decoded)"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_hash(img: Image.Image) -> str:
    """Hash of decoded RGB pixels and size: equal for the same picture in any encoding."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's convert() clips 16-bit values at 255 (an all-white image); scale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max(initial=1.0)), 1.0)
        arr8 = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes | None,
    max_pixels: int = 100_000_000,
    animated: Literal["reject", "first_frame"] = "reject",
    draft_size: int | None = None,
) -> Decoded:
    """Decode ``data`` to RGB or say why not.

    ``draft_size``: when set and the image is a JPEG at least twice as large on its
    short side, decode it reduced (1/2, 1/4 or 1/8) to no less than this short side.
    """
    data = data or b""
    digest = sha256_bytes(data)

    def reject(reason: str, detail: str, w: int | None = None, h: int | None = None) -> Decoded:
        return Decoded(None, w, h, digest, None, reason, detail)

    if not data:
        return reject(REJECT_DECODE, "zero bytes")
    stored = header_size(data)
    if stored is not None and stored[0] * stored[1] > max_pixels:
        return reject(REJECT_BOMB, _bomb_detail(*stored, max_pixels, "from the header"), *stored)
    try:
        with pillow_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            orientation = 1
            try:
                orientation = int(img.getexif().get(_ORIENTATION, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation
                pass
            if orientation in _SWAPS_AXES:
                w, h = h, w
            if w * h > max_pixels:
                return reject(REJECT_BOMB, _bomb_detail(w, h, max_pixels, "from the header"), w, h)
            if w <= 0 or h <= 0:
                return reject(REJECT_DECODE, f"empty image {w}x{h}")
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            if n_frames > 1:
                if animated == "reject":
                    return reject(REJECT_ANIMATED, f"{img.format} with {n_frames} frames", w, h)
                img.seek(0)
            reduced = 1
            if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
                before = img.size
                img.draft("RGB", (draft_size, draft_size))  # keeps both sides >= draft_size
                reduced = max(1, before[0] // max(1, img.size[0]))
            img.load()  # decode now: truncated and corrupt data fail here
            img = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = _to_rgb(img)
    except Image.DecompressionBombError as exc:
        # Pillow refused while opening (a frame or tile larger than the header said, or
        # a format we do not read the size of): say what is known.
        if stored is not None:
            return reject(REJECT_BOMB, _bomb_detail(*stored, max_pixels, "Pillow's check"), *stored)
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        return reject(REJECT_BOMB, f"{pixels} > max_pixels {max_pixels:,} (Pillow's check, not decoded)")
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        what = "HTML/XML text" if head.startswith((b"<", b"<!doctype")) else "not a recognised image format"
        return reject(REJECT_DECODE, f"{what} ({len(data):,} bytes)")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError, IndexError) as exc:
        return reject(REJECT_DECODE, one_line(f"{type(exc).__name__}: {exc}"))
    return Decoded(rgb, w, h, digest, pixel_hash(rgb), reduced=reduced)


@dataclass
class Probe:
    """What the header says, without decoding any pixels (see :func:`probe`)."""

    width: int | None
    height: int | None
    n_frames: int
    format: str | None
    bomb: str | None = None  # the decompression-bomb detail when above max_pixels


def probe(data: bytes, max_pixels: int) -> Probe | None:
    """Size, frame count and format of ``data`` from its header (no pixel is decoded).

    None when Pillow does not recognise the bytes. ``bomb`` is set, and the frames are
    not counted, when the header claims more than ``max_pixels``. Used by the download
    guard (:mod:`curation.resize_guard`) before img2dataset's OpenCV decode.
    """
    stored = header_size(data)
    if stored is not None and stored[0] * stored[1] > max_pixels:
        return Probe(*stored, 1, None, _bomb_detail(*stored, max_pixels, "from the header"))
    try:
        with pillow_pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                return Probe(w, h, 1, img.format, _bomb_detail(w, h, max_pixels, "from the header"))
            return Probe(w, h, int(getattr(img, "n_frames", 1) or 1), img.format)
    except Image.DecompressionBombError:
        w, h = stored if stored is not None else (None, None)
        return Probe(w, h, 1, None, f"more than max_pixels {max_pixels:,} (Pillow's check, not decoded)")
    except Exception:  # noqa: BLE001 - unreadable: the caller's decoder says what is wrong
        return None


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop to ``size x size``.

    The same geometry as open_clip's eval transform (Resize(size) + CenterCrop(size)),
    done in PIL on uint8 so the model stage only scales and normalises.
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
