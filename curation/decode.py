"""Image bytes -> RGB pixels, or a reject reason. Never raises on bad input.

Web images come in every state: truncated, empty, HTML error pages saved as .jpg,
CMYK JPEGs, palette and 16-bit PNGs, transparency, EXIF-rotated photos, animations,
and headers claiming gigapixels (decompression bombs). :func:`decode_image` turns
each into either an RGB :class:`PIL.Image.Image` or one of the reasons below, with
a human-readable detail.

Size is measured on the original (after EXIF rotation) before anything is reduced;
``draft_size`` only changes how many pixels are decoded (JPEG DCT scaling, the
cheapest way to get a small image out of a large JPEG).
"""

from __future__ import annotations

import hashlib
import io
import warnings
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
    try:
        with warnings.catch_warnings():
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
                return reject(REJECT_BOMB, f"{w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,}", w, h)
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
        return reject(REJECT_BOMB, str(exc))
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        what = "HTML/XML text" if head.startswith((b"<", b"<!doctype")) else "not a recognised image format"
        return reject(REJECT_DECODE, f"{what} ({len(data):,} bytes)")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError, IndexError) as exc:
        return reject(REJECT_DECODE, f"{type(exc).__name__}: {exc}"[:300])
    return Decoded(rgb, w, h, digest, pixel_hash(rgb), reduced=reduced)


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
