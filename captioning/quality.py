"""Quality flags on generated captions: counted in the summary, stored with each caption.

A flag never drops a caption (the "selected caption" rule decides what to use).
Flags:

- ``empty``        no text at all
- ``truncated``    generation hit ``max_new_tokens`` (finish reason ``length``)
- ``too_short``    fewer than ``quality.min_words`` words (50 by default)
- ``repetition``   a decoding loop: too many repeated word n-grams, or a span repeated
                   several times at the very end
- ``refusal``      the model declined ("I'm sorry, I cannot ...") near the start
- ``not_english``  the language identifier (py3langid, as the filter stage uses) says
                   another language, or is unsure
- ``error``        no caption: the image did not decode or the model failed on it
"""

from __future__ import annotations

import functools
import re

from captioning.config import QualityFlags

FLAGS = ("empty", "truncated", "too_short", "repetition", "refusal", "not_english", "error")

_WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)


def words(text: str | None) -> list[str]:
    """Words of ``text`` (letters and digits, keeping inner apostrophes and hyphens)."""
    return _WORD_RE.findall(text or "")


def repeated_ngram_fraction(tokens: list[str], n: int) -> float:
    """Share of the word n-grams that already occurred earlier in the text."""
    if len(tokens) < n + 1:
        return 0.0
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def tail_loop(tokens: list[str], repeats: int, max_period: int = 12) -> bool:
    """True when the text ends with a span of 1..max_period words repeated ``repeats`` times."""
    for p in range(1, max_period + 1):
        if len(tokens) < p * repeats:
            break
        tail = tokens[-p:]
        if all(tokens[-(k + 1) * p : len(tokens) - k * p] == tail for k in range(1, repeats)):
            return True
    return False


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> list[re.Pattern]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def caption_flags(caption: str | None, finish_reason: str, q: QualityFlags) -> list[str]:
    """The quality flags of one caption, in :data:`FLAGS` order."""
    if finish_reason == "error":
        return ["error"]
    text = (caption or "").strip()
    flags: list[str] = []
    toks = [w.lower() for w in words(text)]
    if not text:
        flags.append("empty")
    if finish_reason == "length":
        flags.append("truncated")
    if text and len(toks) < q.min_words:
        flags.append("too_short")
    if toks and (
        repeated_ngram_fraction(toks, q.repetition_ngram) > q.repetition_max_fraction
        or tail_loop(toks, q.repetition_tail_repeats)
    ):
        flags.append("repetition")
    head = text[: q.refusal_window]
    if head and any(p.search(head) for p in _compiled(tuple(q.refusal_patterns))):
        flags.append("refusal")
    if q.language and toks:
        from curation.filters import identify_language

        lang, score = identify_language(text)
        if lang != q.language or (score is not None and score < q.language_min_score):
            flags.append("not_english" if q.language == "en" else f"not_{q.language}")
    return flags
