"""Filters: each answers "keep this row? and if not, why" (the datatrove shape).

A row is a mapping of measurements (``width``, ``height``, ``caption``, ``language``,
``language_score``, ``aesthetic``, ``clip_score``). A filter's :meth:`Filter.check`
returns ``None`` to keep it or ``(reason, detail)``. The first filter that rejects
gives the row's ``reject_reason``, so the funnel counts each image once, under the
cheapest check it failed. Two groups: :func:`cheap_filters` need only the header and
the alt text (run before any model work, which is skipped for rejected rows);
:func:`model_filters` need the CLIP and aesthetic scores.

Duplicates need every shard at once, so they are decided separately by
:func:`decide_duplicates` over the hashes (and embeddings) of all candidate rows.

Where the default thresholds come from (see ``pipelines.yaml``): LAION-Aesthetics V2
kept aesthetic scores >= 5, 6 and 6.5 for its three subsets; LAION-5B kept image-text
pairs whose ViT-B/32 CLIP cosine was >= 0.28 (ViT-L/14 cosines run lower on the same
pairs, so re-calibrate the CLIP threshold for the model you run); LAION-5B dropped alt
texts under 5 characters.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from curation.config import FilterThresholdsConfig

Rejection = tuple[str, str]  # (reason, detail)

# A "word" is a run of non-space characters, except that each CJK character counts as one
# (Chinese and Japanese are written without spaces).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def count_words(text: str) -> int:
    """Words in ``text``: whitespace-separated, each CJK character counted as a word."""
    return len(_WORD_RE.findall(text))


# Reasons, as stored in scores.reject_reason and counted in the funnel.
REJECT_DOWNLOAD = "download_failed"
REJECT_TOO_SMALL = "too_small"
REJECT_ASPECT = "aspect_ratio"
REJECT_CAPTION_SHORT = "caption_too_short"
REJECT_CAPTION_LONG = "caption_too_long"
REJECT_LANGUAGE = "language"
REJECT_AESTHETIC = "low_aesthetic"
REJECT_CLIP = "low_clip_score"
REJECT_DUPLICATE = "duplicate"
REJECT_NEAR_DUPLICATE = "near_duplicate"
REJECT_NSFW = "nsfw"  # the same reason as an input punsafe above download.punsafe_max
REJECT_WATERMARK = "watermark"  # the same reason as an input pwatermark above download.pwatermark_max


class Filter:
    """Base class: ``check(row)`` is ``None`` to keep the row, else ``(reason, detail)``."""

    name = "filter"

    def check(self, row: Mapping) -> Rejection | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


@dataclass(repr=False)
class MinShortSide(Filter):
    """The original image's short side (after EXIF rotation) must be at least ``min_side`` px."""

    min_side: int

    def check(self, row: Mapping) -> Rejection | None:
        short = min(row["width"], row["height"])
        if short < self.min_side:
            return REJECT_TOO_SMALL, f"short side {short} px < {self.min_side}"
        return None


@dataclass(repr=False)
class MaxAspectRatio(Filter):
    """Long side / short side must be at most ``max_ratio``."""

    max_ratio: float

    def check(self, row: Mapping) -> Rejection | None:
        w, h = row["width"], row["height"]
        ratio = max(w, h) / max(1, min(w, h))
        if ratio > self.max_ratio:
            return REJECT_ASPECT, f"aspect ratio {ratio:.2f} > {self.max_ratio:g}"
        return None


@dataclass(repr=False)
class CaptionLength(Filter):
    """Alt-text length bounds, in characters (stripped) and whitespace-separated words."""

    min_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None

    def check(self, row: Mapping) -> Rejection | None:
        text = (row.get("caption") or "").strip()
        n_words = count_words(text)
        if self.min_chars is not None and len(text) < self.min_chars:
            return REJECT_CAPTION_SHORT, f"{len(text)} characters < {self.min_chars}"
        if self.min_words is not None and n_words < self.min_words:
            return REJECT_CAPTION_SHORT, f"{n_words} words < {self.min_words}"
        if self.max_words is not None and n_words > self.max_words:
            return REJECT_CAPTION_LONG, f"{n_words} words > {self.max_words}"
        return None


@dataclass(repr=False)
class Language(Filter):
    """The alt text must be in one of ``allowed``; a detection below ``min_score`` is not trusted.

    Short alt texts ("a cat") are often identified wrongly and with low confidence, so
    only a confident identification of another language rejects.
    """

    allowed: Sequence[str]
    min_score: float = 0.5

    def check(self, row: Mapping) -> Rejection | None:
        lang, score = row.get("language"), row.get("language_score")
        if not self.allowed or lang is None or score is None:
            return None
        if lang not in self.allowed and score >= self.min_score:
            return REJECT_LANGUAGE, f"{lang} (p={score:.2f}), allowed: {','.join(self.allowed)}"
        return None


@dataclass(repr=False)
class MinScore(Filter):
    """A model score (``column``) must be at least ``minimum``."""

    column: str
    minimum: float
    reason: str

    def check(self, row: Mapping) -> Rejection | None:
        value = row.get(self.column)
        if value is None or not np.isfinite(value):
            return self.reason, f"no {self.column} score"
        if value < self.minimum:
            return self.reason, f"{self.column} {value:.4f} < {self.minimum:g}"
        return None


@dataclass(repr=False)
class MaxScore(Filter):
    """A model score (``column``) must be at most ``maximum``; no score (model off) keeps the row."""

    column: str
    maximum: float
    reason: str

    def check(self, row: Mapping) -> Rejection | None:
        value = row.get(self.column)
        if value is None or not np.isfinite(value):
            return None
        if value > self.maximum:
            return self.reason, f"{self.column} {value:.4f} > {self.maximum:g}"
        return None


def cheap_filters(t: FilterThresholdsConfig) -> list[Filter]:
    """Filters on size and alt text, in funnel order; run before any model work."""
    out: list[Filter] = []
    if t.min_short_side is not None:
        out.append(MinShortSide(t.min_short_side))
    if t.max_aspect_ratio is not None:
        out.append(MaxAspectRatio(t.max_aspect_ratio))
    if t.caption_min_chars is not None or t.caption_min_words is not None or t.caption_max_words is not None:
        out.append(CaptionLength(t.caption_min_chars, t.caption_min_words, t.caption_max_words))
    if t.languages:
        out.append(Language(list(t.languages), t.language_min_score))
    return out


def model_filters(t: FilterThresholdsConfig) -> list[Filter]:
    """Filters on the model scores, in funnel order."""
    out: list[Filter] = []
    if t.nsfw_max is not None:  # first: an unsafe image is counted as such whatever its other scores
        out.append(MaxScore("nsfw", t.nsfw_max, REJECT_NSFW))
    if t.watermark_max is not None:
        out.append(MaxScore("watermark", t.watermark_max, REJECT_WATERMARK))
    if t.aesthetic_min is not None:
        out.append(MinScore("aesthetic", t.aesthetic_min, REJECT_AESTHETIC))
    if t.clip_score_min is not None:
        out.append(MinScore("clip_score", t.clip_score_min, REJECT_CLIP))
    return out


def first_rejection(filters: Sequence[Filter], row: Mapping) -> Rejection | None:
    """The first filter that rejects ``row``, or None when all keep it."""
    for f in filters:
        found = f.check(row)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- language id
@functools.lru_cache(maxsize=1)
def _identifier():
    # py3langid ships its model inside the wheel (no download); loaded once per process.
    from paradiffusion.deps import require

    langid = require("py3langid.langid", "py3langid", extra="curation")
    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


def identify_language(text: str | None) -> tuple[str | None, float | None]:
    """``(ISO 639-1 code, probability)`` of the alt text, ``(None, None)`` when it has no letters."""
    text = (text or "").strip()
    if not any(ch.isalpha() for ch in text):
        return None, None
    lang, score = _identifier().classify(text)
    return str(lang), float(score)


# --------------------------------------------------------------------------- duplicates
@dataclass
class DuplicateDecision:
    reason: str  # REJECT_DUPLICATE or REJECT_NEAR_DUPLICATE
    duplicate_of: str  # the kept key it duplicates
    detail: str


def exact_duplicates(
    keys: Sequence[str], sha256: Sequence[str | None], pixel_hashes: Sequence[str | None]
) -> dict[str, DuplicateDecision]:
    """Rows with the same bytes (sha256) or the same decoded pixels (pixel hash) form a
    group (transitively); every row but the lowest key of its group is a duplicate of it."""
    n = len(keys)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for hashes in (sha256, pixel_hashes):
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h is None:
                continue
            j = first.setdefault(h, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
    best: dict[int, int] = {}  # root -> index of the lowest key in the group
    for i in range(n):
        r = find(i)
        if r not in best or keys[i] < keys[best[r]]:
            best[r] = i
    out: dict[str, DuplicateDecision] = {}
    for i in range(n):
        keep = best[find(i)]
        if keep != i:
            same_bytes = sha256[i] is not None and sha256[i] == sha256[keep]
            out[keys[i]] = DuplicateDecision(
                REJECT_DUPLICATE, keys[keep], "same bytes" if same_bytes else "same decoded pixels"
            )
    return out


def near_duplicate_decisions(sorted_keys: Sequence[str], pairs, near_min: float) -> dict[str, DuplicateDecision]:
    """:func:`curation.neardup.decide` on ``pairs`` (positions in ``sorted_keys``), as decisions by key."""
    from curation.neardup import decide

    return {
        sorted_keys[i]: DuplicateDecision(
            REJECT_NEAR_DUPLICATE, sorted_keys[j], f"embedding cosine {sim:.4f} >= {near_min:g}"
        )
        for i, (j, sim) in decide(len(sorted_keys), pairs).items()
    }


def decide_duplicates(
    keys: Sequence[str],
    sha256: Sequence[str | None],
    pixel_hashes: Sequence[str | None],
    embeddings: np.ndarray | None = None,
    near_min: float = 0.97,
    block: int = 2048,
) -> dict[str, DuplicateDecision]:
    """Which candidate rows are duplicates, and of which kept row (everything in memory).

    The inputs are the rows that passed every other filter. Exact duplicates first
    (:func:`exact_duplicates`: lowest key kept, so the result does not depend on shard
    order or on how many workers ran). With ``embeddings`` (L2-normalised, one row per
    key, NaN rows ignored), a remaining row whose cosine with an earlier (lower-key) kept
    row is >= ``near_min`` is a near duplicate of the lowest such row: an exact all-pairs
    search (:func:`curation.neardup.exact_pairs`). The filter's pass 2 streams the
    embeddings instead and can search them approximately (``filter.near_dup``).
    """
    from curation.neardup import exact_pairs

    out = exact_duplicates(keys, sha256, pixel_hashes)
    if embeddings is None:
        return out
    order = sorted((i for i in range(len(keys)) if keys[i] not in out), key=lambda i: keys[i])
    emb = np.asarray(embeddings, dtype=np.float32)[order]
    valid = np.isfinite(emb).all(axis=1)
    sorted_keys = [keys[order[i]] for i in np.flatnonzero(valid)]
    pairs = exact_pairs(emb[valid], near_min, block)
    out.update(near_duplicate_decisions(sorted_keys, pairs, near_min))
    return out
