"""Nouns per caption with an offline part-of-speech tagger.

The tagger is TextBlob's ``PatternTagger``: a Brill-style tagger whose lexicon ships inside
the ``textblob`` wheel, so it runs offline (NLTK's taggers need data downloaded at run time,
which this toolkit never does). A noun is a token tagged ``NN``, ``NNS``, ``NNP`` or ``NNPS``.
Where textblob is not installed, :func:`noun_counter` returns None and the report says so
instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable

NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
UNAVAILABLE = "n/a: no POS tagger (pip install textblob)"


def noun_counter() -> Callable[[str], int] | None:
    """A function counting the nouns of a text, or None when no offline tagger is installed."""
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError:
        return None
    tagger = PatternTagger()

    def count(text: str) -> int:
        if not text or not text.strip():
            return 0
        return sum(1 for _, tag in tagger.tag(text) if tag in NOUN_TAGS)

    return count
