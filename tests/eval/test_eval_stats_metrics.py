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


def test_clip_score_is_the_mean_over_chunks(tmp_path, tiny_clip):
    from PIL import Image

    from curation.models import load_clip
    from eval.metrics import ClipScorer

    clip = load_clip(tiny_clip["clip_model"], device="cpu")
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


def _pixel_features(images: list) -> np.ndarray:
    """A deterministic stand-in for a feature extractor: 4x4 RGB thumbnails (48-d)."""
    return np.stack([np.asarray(im.resize((4, 4)), dtype=np.float64).ravel() / 255 for im in images])


def _write_images(folder, n: int, seed: int, shift: int = 0) -> list:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"im{i:03d}.png"
        arr = np.clip(rng.normal(120 + shift, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_fid_streams_in_batches_and_equals_the_in_memory_result(tmp_path):
    from PIL import Image

    from eval.metrics import FeatureStats, fid_from_stats, stream_stats

    ref = _write_images(tmp_path / "ref", 11, seed=0)
    gen = _write_images(tmp_path / "gen", 7, seed=1, shift=30)
    live, peak, batches = [0], [0], []

    def load(path):
        live[0] += 1  # decoded and not yet turned into features
        peak[0] = max(peak[0], live[0])
        return Image.open(path).convert("RGB")

    def extract(ims):
        batches.append(len(ims))
        live[0] -= len(ims)
        return _pixel_features(ims)

    s_ref = stream_stats(ref, load, extract, batch_size=3)
    s_gen = stream_stats(gen, load, extract, batch_size=3)
    assert batches == [3, 3, 3, 2, 3, 3, 1] and peak[0] == 3  # never more than one batch decoded
    all_ref = _pixel_features([Image.open(p).convert("RGB") for p in ref])
    all_gen = _pixel_features([Image.open(p).convert("RGB") for p in gen])
    np.testing.assert_allclose(s_ref.mean, all_ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s_ref.cov(), np.cov(all_ref, rowvar=False), rtol=1e-9, atol=1e-14)
    in_memory = fid_from_features(all_gen, all_ref)  # how FID was computed before it streamed
    assert in_memory > 0.01
    assert fid_from_stats(s_gen, s_ref) == pytest.approx(in_memory, rel=1e-9)
    # the merge is exact for any batching, including a large offset (no sum-of-squares cancellation)
    big = all_ref + 1e4
    one = FeatureStats()
    for i in range(0, len(big), 4):
        one.update(big[i : i + 4])
    np.testing.assert_allclose(one.cov(), np.cov(big, rowvar=False), rtol=1e-7, atol=1e-10)


def test_fid_reference_statistics_are_cached_per_reference_set(tmp_path):
    from eval.metrics import reference_stats
    from paradiffusion.stage import StageSummary
    from paradiffusion.storage import Table

    paths = _write_images(tmp_path / "ref", 5, seed=2)
    (tmp_path / "ref" / "broken.png").write_bytes(b"not an image")
    cache = Table(str(tmp_path / "metrics"))
    calls = []

    def extract(ims):
        calls.append(len(ims))
        return _pixel_features(ims)

    s1 = StageSummary("t")
    first, cached = reference_stats(str(tmp_path / "ref"), extract, "pixels-4x4", 2, cache, s1)
    assert not cached and first.n == 5 and sum(calls) == 5 and s1.rejected["fid_reference_unreadable"] == 1

    def must_not_run(ims):
        raise AssertionError("the cached statistics should have been used")

    s2 = StageSummary("t")
    again, cached = reference_stats(str(tmp_path / "ref"), must_not_run, "pixels-4x4", 2, cache, s2)
    assert cached and again.n == 5 and s2.rejected["fid_reference_unreadable"] == 1
    np.testing.assert_array_equal(again.m2, first.m2)
    # another extractor, or a changed reference set, is another cache entry
    assert not reference_stats(str(tmp_path / "ref"), extract, "other", 2, cache, StageSummary("t"))[1]
    _write_images(tmp_path / "ref", 6, seed=3)  # rewrites the five and adds one
    changed, cached = reference_stats(str(tmp_path / "ref"), extract, "pixels-4x4", 2, cache, StageSummary("t"))
    assert not cached and changed.n == 6 and not np.allclose(changed.mean, first.mean)
    assert len(paths) == 5


def test_fid_reference_cache_follows_the_weights_content(tmp_path, make_images, tiny_clip):
    """New CLIP weights copied over the old ones in the same folder (same file name, same
    size, same modification time) rebuild the cached reference statistics, and FID
    changes with them; the same weights again reuse the cache. The reference folder is
    keyed by content too: an image rewritten with its old timestamp is seen."""
    import os
    import shutil

    import torch
    import yaml

    from curation.models import load_clip
    from eval.metrics import compute_fid
    from paradiffusion.stage import StageSummary
    from paradiffusion.storage import Table
    from pipelines.config import load_config

    live = tmp_path / "live"
    shutil.copytree(tiny_clip["clip_model"], live)
    weights = live / "open_clip_pytorch_model.bin"
    stamp = weights.stat()
    old_bytes = weights.read_bytes()
    state = torch.load(weights, map_location="cpu")
    torch.manual_seed(7)
    for v in state.values():  # perturbed in place: the same layout, so the same file size
        if v.is_floating_point():
            v.add_(0.05 * torch.randn_like(v))
    (tmp_path / "new").mkdir()
    torch.save(state, tmp_path / "new" / weights.name)  # the archive's inner names follow the file name
    new_bytes = (tmp_path / "new" / weights.name).read_bytes()
    assert len(new_bytes) == len(old_bytes) and new_bytes != old_bytes
    images = make_images(tmp_path / "images", n_prompts=4, size=32)
    _write_images(tmp_path / "ref", 6, seed=2)
    doc = {
        "project": {"data_root": str(tmp_path / "data")},
        "eval": {
            "metrics": {
                "clip_model": str(live),
                "fid_reference": str(tmp_path / "ref"),
                "batch_size": 4,
                "device": "cpu",
            }
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_config([tmp_path / "c.yaml"])
    cache = Table(str(tmp_path / "metrics"))

    def fid() -> tuple[float, bool]:
        clip = load_clip(str(live), None, device="cpu")
        out = compute_fid(cfg, images, clip, StageSummary("t"), cache=cache)
        return out["results"]["alpha/set1"]["fid"], out["reference_cached"]

    fid_a, cached = fid()
    assert not cached and fid() == (fid_a, True)
    weights.write_bytes(new_bytes)  # new weights in place, old size and mtime
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    fid_b, cached = fid()
    assert not cached and fid_b != pytest.approx(fid_a, rel=1e-6)
    assert fid() == (fid_b, True)
    weights.write_bytes(old_bytes)  # back to the first weights: their entry is used again
    assert fid() == (fid_a, True)
    ref = sorted((tmp_path / "ref").iterdir())[0]  # a reference image changed, its timestamp kept
    st = ref.stat()
    _write_images(tmp_path / "other", 1, seed=9)
    shutil.copyfile(tmp_path / "other" / "im000.png", ref)
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fid()[1] is False
