"""The header checks img2dataset's resizer lacks, run before it decodes anything.

img2dataset 1.47's ``Resizer`` decodes every image in full with OpenCV and only then
compares the area with ``max_image_area``: a 21 KB PNG whose header says 30000x30000
costs 2.7 GB before it is refused, in every download thread. And OpenCV reads the first
frame of an animated GIF/WebP/PNG, so re-encoding turns an animation into a still that
no later stage can recognise. :class:`GuardedResizer` is img2dataset's ``Resizer`` with
the hash denylists checked on the bytes first (when the safe downloader of
:mod:`curation.safety.hooks` sets them), then two checks, both from the header (:func:`curation.decode.probe`, no pixel
decoded):

- more than ``max_image_area`` pixels: refused as ``image area too large: WxH ...``
  (the download summary's ``area_too_large``), before OpenCV sees it;
- several frames: stored as downloaded (no re-encode), so the filter's
  ``decode.animated`` policy decides, with its own reason.

img2dataset's ``download()`` builds its resizer itself and has no hook for another one,
so :func:`guarded_resizer` swaps the class in ``img2dataset.main`` for the length of the
call. The instance travels to img2dataset's worker processes (spawned, or Ray tasks) by
pickle, which imports this module there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# albumentations (imported by img2dataset's resizer) asks PyPI for a newer version on
# import, and warns, unless told not to; a download worker has no business doing that.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset.resizer import Resizer  # noqa: E402

from curation.decode import probe


class GuardedResizer(Resizer):
    """img2dataset's ``Resizer`` with a header pixel limit and animations kept as they are."""

    #: hash denylists (:class:`curation.safety.lists.SafetyLists`), set by the safe downloader
    safety = None

    def __call__(self, img_stream, blurring_bbox_list=None):
        if self.safety is not None:
            img_stream.seek(0)
            found = self.safety.check_bytes(img_stream.read())
            img_stream.seek(0)
            if found is not None:  # refused before anything is decoded or written
                return None, None, None, None, None, f"{found[0]}: {found[1]}"
        if self.disable_all_reencoding:
            return super().__call__(img_stream, blurring_bbox_list)
        img_stream.seek(0)
        data = img_stream.read()
        img_stream.seek(0)
        limit = self.max_image_area
        head = probe(data, int(limit) if limit != float("inf") else 2**62)
        if head is not None:
            if head.bomb is not None:
                return None, None, None, None, None, f"image area too large: {head.bomb}"
            if head.n_frames > 1:
                # Kept byte for byte: the filter rejects it as `animated` or keeps a frame.
                return data, head.width, head.height, head.width, head.height, None
        return super().__call__(img_stream, blurring_bbox_list)


@contextlib.contextmanager
def guarded_resizer() -> Iterator[None]:
    """Make ``img2dataset.download`` build a :class:`GuardedResizer` inside this block."""
    import importlib

    # the package's `main` attribute is the CLI function, which hides the module of that name
    i2d_main = importlib.import_module("img2dataset.main")
    original = i2d_main.Resizer
    i2d_main.Resizer = GuardedResizer
    try:
        yield
    finally:
        i2d_main.Resizer = original
