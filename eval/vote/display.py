"""What a voter's browser receives is a function of the pixels only.

Every image the voting app serves is decoded and re-encoded here: turned upright (EXIF
orientation), transparency flattened on white, brought to the study's one size
(``eval.vote.size``) by a centre crop to that aspect and a Lanczos resize, and written
as one baseline JPEG at one quality with no metadata at all (no EXIF, no ICC profile,
no comments, no timestamps, no PNG chunks). So the file format, the size on screen,
the headers and the metadata of a served image are the same for every model; only the
pixels differ.

There is no padding: a letterbox would show bars wherever a source's shape differs
from the study's and so name the model. Pairs whose sources differ in size or aspect
are refused by ``vote-pairs`` unless ``eval.vote.equalise: crop`` says both may be
centre-cropped (:func:`eval.vote.pairs.build_pairs`); generating every model at the
study's size is the clean way.
"""

from __future__ import annotations

import io

#: The one format, quality and chroma subsampling of every served image.
MEDIA_TYPE = "image/jpeg"
JPEG_QUALITY = 90
JPEG_SUBSAMPLING = 0  # 4:4:4, so thin coloured detail survives
#: Part of the render cache key: bump it when the rendering changes.
RENDER_VERSION = "jpeg90-444-fit-v1"
#: Sources larger than this many pixels are refused (a decompression bomb is a bad image).
MAX_SOURCE_PIXELS = 64_000_000


class BadImage(Exception):
    """A source image that cannot be decoded (truncated, not an image, too large)."""


def _to_rgb(image):
    """Any Pillow mode -> RGB, transparency composited on white.

    A few lines rather than an import of the curation decoder: eval does not depend on
    another stage (imports point down only).
    """
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def render(image, size: tuple[int, int]):
    """``image`` (PIL, any mode) upright, in RGB, centre-cropped to the aspect of ``size``
    and resized to exactly ``size`` (width, height). A new image with no ``info``."""
    from PIL import Image, ImageOps

    image = _to_rgb(ImageOps.exif_transpose(image))
    if image.size != tuple(size):
        image = ImageOps.fit(image, tuple(size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    # a fresh image from the raw pixels: nothing of the source's info (ICC, EXIF, dpi, text) survives
    return Image.frombytes("RGB", image.size, image.tobytes())


def encode(image) -> bytes:
    """One RGB image as the served JPEG: baseline, :data:`JPEG_QUALITY`, 4:4:4, no metadata."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False)
    return buf.getvalue()


def render_file(path, size: tuple[int, int]) -> bytes:
    """The image at ``path`` as served (see the module docstring); :class:`BadImage` when
    it cannot be decoded in full."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_SOURCE_PIXELS:
                raise BadImage(f"{w}x{h} is over {MAX_SOURCE_PIXELS} pixels")
            im.load()  # a truncated file fails here, not half-way through the resize
            out = render(im, size)
    except BadImage:
        raise
    except Image.UnidentifiedImageError as exc:
        raise BadImage("UnidentifiedImageError: cannot identify the image format") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder error (OSError, SyntaxError, bombs...) is a bad image
        raise BadImage(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    return encode(out)


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file header (no full decode)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size
