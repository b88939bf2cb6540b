"""Quality flags on crafted captions."""

import pytest

from captioning.config import QualityFlags
from captioning.quality import caption_flags, repeated_ngram_fraction, tail_loop, words

GOOD = (
    "The image shows a quiet mountain lake at sunrise. Tall pine trees stand on the left bank and their "
    "reflections fall across the still water. In the center a small wooden boat floats near a pier, and behind "
    "it the mountains rise under a pale blue sky with a few white clouds. On the right side a path of grey "
    "stones leads from the water up to a cabin with a red roof and a smoking chimney."
)


@pytest.mark.parametrize(
    ("caption", "finish", "expected"),
    [
        (GOOD, "stop", []),
        (GOOD, "length", ["truncated"]),
        ("", "stop", ["empty"]),
        ("   ", "stop", ["empty"]),
        ("A cat on a mat.", "stop", ["too_short"]),
        (GOOD + " and the dog and the dog and the dog and the dog and the dog", "length", ["truncated", "repetition"]),
        ("I'm sorry, but I cannot describe this image. " + GOOD, "stop", ["refusal"]),
        ("As an AI, I am unable to see images. " + GOOD, "stop", ["refusal"]),
        (
            "Eine rote Katze schläft auf einem sonnigen Fensterbrett neben einer grünen Pflanze, während draußen "
            "die Sonne über den Dächern der alten Stadt untergeht und die Straßen in warmes Licht taucht. " * 3,
            "stop",
            ["repetition", "not_english"],
        ),
        (None, "error", ["error"]),
    ],
)
def test_flags(caption, finish, expected):
    assert caption_flags(caption, finish, QualityFlags()) == expected


def test_thresholds_are_configurable():
    q = QualityFlags(min_words=6, language=None)
    assert caption_flags("A cat on a mat.", "stop", q) == ["too_short"]
    assert caption_flags("A cat sits on a red mat.", "stop", q) == []
    assert "not_english" not in caption_flags("Un chat roux dort sur le rebord de la fenêtre.", "stop", q)
    assert (
        caption_flags(
            "I'm sorry about the cat, it sits on a mat.",
            "stop",
            QualityFlags(min_words=1, language=None, refusal_patterns=[]),
        )
        == []
    )


def test_repetition_helpers():
    loop = words("a red car " + "near the tree " * 4)
    assert tail_loop(loop, 3)
    assert not tail_loop(words(GOOD), 3)
    assert repeated_ngram_fraction(words(GOOD), 4) < 0.05
    assert repeated_ngram_fraction(words("blue sky " * 20), 4) > 0.8
    assert words("it's a well-known place, 3 cats") == ["it's", "a", "well-known", "place", "3", "cats"]
