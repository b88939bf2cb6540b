"""The per-image filters, language identification and duplicate decisions."""

from __future__ import annotations

import numpy as np

from curation.config import FilterThresholdsConfig
from curation.filters import (
    REJECT_AESTHETIC,
    REJECT_ASPECT,
    REJECT_CAPTION_LONG,
    REJECT_CAPTION_SHORT,
    REJECT_CLIP,
    REJECT_DUPLICATE,
    REJECT_LANGUAGE,
    REJECT_NEAR_DUPLICATE,
    REJECT_TOO_SMALL,
    cheap_filters,
    count_words,
    decide_duplicates,
    first_rejection,
    identify_language,
    model_filters,
)


def _row(**kw):
    row = {
        "width": 800,
        "height": 600,
        "caption": "A red boat on a calm sea.",
        "language": "en",
        "language_score": 0.99,
        "aesthetic": 6.0,
        "clip_score": 0.3,
    }
    row.update(kw)
    return row


def _reason(row, **thresholds):
    t = FilterThresholdsConfig(**thresholds)
    rej = first_rejection(cheap_filters(t) + model_filters(t), row)
    return None if rej is None else rej[0]


def test_each_threshold_rejects_with_its_reason():
    assert _reason(_row()) is None
    assert _reason(_row(width=300, height=511)) == REJECT_TOO_SMALL
    assert _reason(_row(width=2000, height=600)) == REJECT_ASPECT
    assert _reason(_row(caption="boat")) == REJECT_CAPTION_SHORT
    assert _reason(_row(caption="   ")) == REJECT_CAPTION_SHORT
    assert _reason(_row(caption="a b c d e f"), caption_max_words=5) == REJECT_CAPTION_LONG
    assert _reason(_row(language="de", language_score=0.99)) == REJECT_LANGUAGE
    assert _reason(_row(language="gl", language_score=0.09)) is None  # unsure: kept
    assert _reason(_row(language="de", language_score=0.99), languages=[]) is None  # any language
    assert _reason(_row(aesthetic=4.9)) == REJECT_AESTHETIC
    assert _reason(_row(aesthetic=6.4), aesthetic_min=6.5) == REJECT_AESTHETIC
    assert _reason(_row(clip_score=0.19)) == REJECT_CLIP
    assert _reason(_row(clip_score=0.19, aesthetic=1.0)) == REJECT_AESTHETIC  # first failing check wins
    assert _reason(_row(clip_score=None)) == REJECT_CLIP
    assert _reason(_row(width=10, height=10, aesthetic=1.0), min_short_side=None, aesthetic_min=None) is None


def test_count_words_handles_cjk():
    assert count_words("A cat on a mat") == 5
    assert count_words("一只橘色的猫") == 6
    assert count_words("") == 0


def test_identify_language_ships_its_model():
    assert identify_language("A ginger tabby cat resting on a wooden floor.")[0] == "en"
    lang, p = identify_language("Eine rote Katze schläft auf einem sonnigen Fensterbrett.")
    assert lang == "de" and p > 0.9
    assert identify_language("  12345 ") == (None, None)


def test_exact_duplicates_keep_the_lowest_key_transitively():
    keys = ["k5", "k1", "k3", "k4", "k2"]
    sha = ["a", "a", "b", "c", "d"]
    px = ["p1", "p2", "p2", "p3", None]  # k1~k5 by bytes, k1~k3 by pixels: one group
    out = decide_duplicates(keys, sha, px)
    assert {k: (d.reason, d.duplicate_of) for k, d in out.items()} == {
        "k5": (REJECT_DUPLICATE, "k1"),
        "k3": (REJECT_DUPLICATE, "k1"),
    }
    assert out["k5"].detail == "same bytes" and out["k3"].detail == "same decoded pixels"


def test_near_duplicates_by_embedding():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16)).astype(np.float32)
    emb = np.vstack([base, base[0] + 0.01 * rng.normal(size=16), np.full(16, np.nan)]).astype(np.float32)
    emb[:4] /= np.linalg.norm(emb[:4], axis=1, keepdims=True)
    keys = ["a", "b", "c", "d", "e"]
    out = decide_duplicates(keys, list("vwxyz"), [None] * 5, emb, near_min=0.97, block=2)
    assert {k: (d.reason, d.duplicate_of) for k, d in out.items()} == {"d": (REJECT_NEAR_DUPLICATE, "a")}


def _planted(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    x = centers[rng.integers(0, 20, n)] + 0.8 * rng.normal(size=(n, d))
    dup = rng.choice(np.arange(1, n), 300, replace=False)
    x[dup] = x[(rng.random(300) * dup).astype(int)] + 0.02 * rng.normal(size=(300, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_search_matches_exact_and_is_deterministic():
    import faiss

    from curation.neardup import ann_pairs, decide, exact_pairs

    x = _planted()
    n, d = x.shape

    def chunks(order=None):
        def gen():
            idx = np.arange(n) if order is None else order
            for s in range(0, n, 700):
                part = idx[s : s + 700]
                yield part, x[part]

        return gen

    exact = decide(n, exact_pairs(x, 0.97))
    assert len(exact) >= 250  # the planted copies (a few fall under the threshold)
    ann = decide(n, ann_pairs(chunks(), n, d, 0.97, nlist=16, storage="fp32"))
    assert {i: j for i, (j, _) in ann.items()} == {i: j for i, (j, _) in exact.items()}
    # the same pairs whatever order the rows arrive in, and with another thread count
    shuffled = np.random.default_rng(1).permutation(n)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        again = decide(n, ann_pairs(chunks(shuffled), n, d, 0.97, nlist=16, storage="fp32"))
    finally:
        faiss.omp_set_num_threads(threads)
    assert again == ann
    # fp16 storage moves cosines by ~1e-3, decisions stay put away from the threshold
    half = decide(n, ann_pairs(chunks(), n, d, 0.97, nlist=16, storage="fp16"))
    assert len(set(half) ^ set(ann)) <= 3
