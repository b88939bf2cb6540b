"""Metrics and statistics on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import chunk_text, fid_from_features, frechet_distance
from eval.prompts import load_paraprompts
from eval.stats import LOSS, TIE, WIN, bootstrap_mean, voting_rate


def test_frechet_distance_known_answers():
    d = 8
    mu = np.arange(d, dtype=float)
    assert frechet_distance(np.zeros(d), np.eye(d), mu, np.eye(d)) == pytest.approx(float(mu @ mu))
    # S1 = I, S2 = 4I: Tr(I + 4I - 2 * 2I) = d
    assert frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), 4 * np.eye(d)) == pytest.approx(d)
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    y = x + 3.0
    assert fid_from_features(x, y) == pytest.approx(16 * 9.0, rel=1e-6)


def test_chunks_cover_every_word_and_fit(benchmarks_dir):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    prompts, _ = load_paraprompts(benchmarks_dir / "ParaPrompts_400.csv", limit=40)
    n_multi = 0
    for p in prompts:
        chunks = chunk_text(p.text, lambda t: len(tok.encode(t)), 75)
        assert " ".join(chunks).split() == p.text.split()  # every word once, in order
        ids = tok(chunks)
        assert all(int(row[-1]) in (0, tok.eot_token_id) for row in ids)  # nothing cut off
        assert all(tok.eot_token_id in row.tolist() for row in ids)
        n_multi += len(chunks) > 1
    assert n_multi == len(prompts)  # every ParaPrompt is longer than CLIP's context
    assert chunk_text("A red car.", lambda t: len(t.split()), 75) == ["A red car."]
    long_sentence = " ".join(["word"] * 30)
    parts = chunk_text(long_sentence, lambda t: len(t.split()), 7)
    assert [len(c.split()) for c in parts] == [7, 7, 7, 7, 2]


def test_bootstrap_mean_contains_mean_and_clusters():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(50), 4)
    v = rng.normal(5, 1, size=200)
    e = bootstrap_mean(v, ids, n_boot=500)
    assert e.low < e.mean < e.high and e.n_prompts == 50 and e.n == 200
    const = bootstrap_mean(np.full(20, 3.0), np.arange(20))
    assert const.low == const.high == const.mean == 3.0
    with_nan = bootstrap_mean([1.0, np.nan, 3.0], ["a", "b", "c"])
    assert with_nan.mean == 2.0 and with_nan.n == 2


def test_voting_rate():
    outcomes = [WIN] * 60 + [TIE] * 20 + [LOSS] * 20
    ids = [f"p{i % 25}" for i in range(100)]
    r = voting_rate(outcomes, ids, "ours", "base", "visual_appeal", n_boot=500)
    assert (r.win.mean, r.tie.mean, r.loss.mean) == pytest.approx((0.6, 0.2, 0.2))
    assert r.gap.mean == pytest.approx(0.4) and r.win_ties_half.mean == pytest.approx(0.7)
    assert r.win.low <= 0.6 <= r.win.high and r.n_prompts == 25


def test_clip_score_is_the_mean_over_chunks(tmp_path):
    from PIL import Image

    from curation.models import load_clip
    from eval.metrics import ClipScorer
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    clip = load_clip(build_tiny_clip(tmp_path)["clip_model"], device="cpu")
    scorer = ClipScorer(clip)
    from eval_prompt_files import SAMPLE_PROMPTS

    prompts, _ = load_paraprompts(SAMPLE_PROMPTS / "paraprompts_sample.csv", limit=1)  # a paragraph
    long_text, short_text = prompts[0].text, "A red car."
    rng = np.random.default_rng(0)
    emb = clip.encode_pil([Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)])
    chunked, truncated, n = scorer.score(emb, [long_text, short_text])
    chunks = scorer.chunks(long_text)
    manual = 100 * float(np.mean(clip.encode_texts(chunks) @ emb[0]))
    assert n.tolist() == [len(chunks), 1] and len(chunks) > 1
    assert chunked[0] == pytest.approx(manual, abs=1e-4)
    assert chunked[1] == pytest.approx(truncated[1], abs=1e-4)  # a short prompt: one chunk, the usual score
