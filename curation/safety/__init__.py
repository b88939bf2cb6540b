"""Safe, consented web data: denylists, opt-outs, input safety metadata, the NSFW head.

- :mod:`curation.safety.lists`: URL / domain / MD5 / SHA-256 (/ PDQ) lists read from
  txt, csv or parquet files (local or any fsspec URL), checked at download and at
  filter; a malformed line stops the run with ``file:line`` before any work.
- :mod:`curation.safety.hooks`: the img2dataset download with these checks in front:
  a denylisted, opted-out or (by its input ``punsafe`` / ``pwatermark``) unsafe row is
  never fetched; a downloaded image whose bytes are denylisted is never written.
- :mod:`curation.safety.nsfw`: LAION's CLIP-based NSFW detector as a torch module on the
  filter's CLIP ViT-L/14 image embedding, and the converter from its Keras weights.

Reasons these add to the funnel (the images table's ``error_message`` starts with the
reason, so the download summary and the filter count them the same way).
"""

from __future__ import annotations

REJECT_DENYLISTED = "denylisted"  # on a denylist (detail: the list's name and what matched)
REJECT_OPTED_OUT = "opted_out"  # an opt-out list, or the site's X-Robots-Tag (img2dataset)
REJECT_NSFW = "nsfw"  # input punsafe or the NSFW head above its threshold
REJECT_WATERMARK = "watermark"  # input pwatermark above its threshold

SAFETY_REASONS = (REJECT_DENYLISTED, REJECT_OPTED_OUT, REJECT_NSFW, REJECT_WATERMARK)


def metadata_limits(cfg, columns: list[str]) -> list[tuple[str, float, str]]:
    """``(column, maximum, reason)`` for the input metadata checks this URL list allows."""
    out = []
    for col, maximum, reason in (
        (cfg.punsafe_col, cfg.punsafe_max, REJECT_NSFW),
        (cfg.pwatermark_col, cfg.pwatermark_max, REJECT_WATERMARK),
    ):
        if maximum is not None and col in columns:
            out.append((col, float(maximum), reason))
    return out
