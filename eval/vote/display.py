"""Showing both images of a pair at one size, so their shape does not name the model.

Two models often generate at different sizes (the ParaDiffusion release samples
1024x640, SDXL 1024x1024). Served as they are, a voter tells them apart by shape
alone. :func:`pair_box` computes one box (width, height) for the pair and
:func:`render` puts each image into it:

- ``letterbox`` (default): the box is the largest width by the largest height of the
  two; each image is scaled to fit inside it, aspect kept, centred on a plain
  background. Nothing of the image is lost; bars remain where the shapes differ.
- ``crop``: both images are centre-cropped to one aspect (the geometric mean of
  their two aspects, so each loses about the same share), then scaled to the same size.
  No bars; the edges of both images are cut.

Images that already have the same size are served unchanged (no re-encoding). Building
pairs from images whose aspects differ warns (:func:`eval.vote.pairs.build_pairs`):
generating both models at the same size is the clean fix.
"""

from __future__ import annotations

import io
import math
from typing import Literal

DisplayMode = Literal["letterbox", "crop"]


def pair_box(size_x: tuple[int, int], size_y: tuple[int, int], mode: DisplayMode) -> tuple[int, int]:
    """The common (width, height) both images of a pair are shown at."""
    (wx, hx), (wy, hy) = size_x, size_y
    if mode == "letterbox":
        return max(wx, wy), max(hx, hy)
    if mode == "crop":
        aspect = math.sqrt((wx / hx) * (wy / hy))
        heights = [min(h, w / aspect) for w, h in ((wx, hx), (wy, hy))]
        box_h = max(heights)
        return max(1, round(box_h * aspect)), max(1, round(box_h))
    raise ValueError(f"display mode must be letterbox or crop, got {mode!r}")


def render(image, box: tuple[int, int], mode: DisplayMode, background: str = "#ffffff"):
    """``image`` (PIL, RGB) placed in ``box`` as ``mode`` says; a new RGB image of exactly ``box``."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if image.size == box:
        return image
    if mode == "crop":
        return ImageOps.fit(image, box, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    canvas = Image.new("RGB", box, background)
    fitted = ImageOps.contain(image, box, method=Image.Resampling.LANCZOS)
    canvas.paste(fitted, ((box[0] - fitted.width) // 2, (box[1] - fitted.height) // 2))
    return canvas


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file header (no full decode)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def render_png(path, box: tuple[int, int], mode: DisplayMode, background: str = "#ffffff") -> bytes:
    """The image at ``path`` rendered into ``box``, as PNG bytes with no text metadata."""
    from PIL import Image

    with Image.open(path) as im:
        out = render(im, box, mode, background)
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
