"""`make eval`: automatic metrics for every generated image, then per model x prompt set
x category with bootstrap confidence intervals (over prompts).

Per image (the ``metrics`` table, :data:`eval.schemas.EVAL_METRICS`, one shard per
``eval_images`` shard, so a rerun scores only new shards):

- ``clip_score``: CLIP's text tower reads at most 77 tokens (75 of text), and most
  ParaPrompts run to 150-400 tokens. Cutting them would score only the first
  sentences, so the prompt is split into sentence chunks that each fit
  (:func:`chunk_text`; a sentence longer than the context is split at word
  boundaries), each chunk is scored against the image and the cosines are averaged.
  Reported as 100 x cosine. ``clip_score_truncated`` (the usual, cut-off score) is
  kept beside it so the two can be compared; ``clip_chunks`` says how many chunks.
- ``long_clip_score``: the same with a Long-CLIP model (248-token context) when
  ``eval.metrics.long_clip_model`` names one (open_clip layout); long prompts are still
  chunked at its context, which is rarely needed.
- ``aesthetic``: curation's LAION aesthetic predictor on the CLIP image embedding.
- ``imagereward`` / ``hpsv2`` / ``pickscore``: only when the package and weights are
  there; otherwise the summary says why they were skipped.

Per set of images (``_fid.json``): FID of each model x prompt set against
``eval.metrics.fid_reference``, a clean implementation (:func:`frechet_distance`) on
CLIP image features (default) or torchvision Inception-v3 pool features
(``fid_features: inception`` with local weights). Neither is the TF-Inception FID of
papers: compare numbers only within this tool. Images are decoded one batch at a time
and their statistics merged (:class:`FeatureStats`), so memory is bounded by the batch,
not the set; the reference statistics are cached per reference set
(``_fid_reference/<key>.npz``, :func:`reference_stats`).

DPG-Bench (prompt sets of kind ``dpg_bench``, ``eval.metrics.dpg``): a VQA judge answers
the official yes/no questions about each image first (:mod:`eval.dpg_judge`); the
per-image ``dpg_score`` / ``dpg_score_corrected`` go into this table and the
DPG-Bench scores per category into ``_dpg.json`` (:mod:`eval.dpg`). A shard scored
before its DPG answers were all there is scored again on the next run.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from eval.dpg_judge import dpg_prompt_sets, judge_dpg
from eval.paths import images_url, metrics_url
from eval.schemas import EVAL_IMAGES, EVAL_METRICS
from eval.stats import bootstrap_mean
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, rows_to_table

log = get_logger("eval.metrics")
STAGE = "eval"
METRIC_COLUMNS = [
    "clip_score",
    "clip_score_truncated",
    "long_clip_score",
    "aesthetic",
    "imagereward",
    "hpsv2",
    "pickscore",
    "dpg_score",
    "dpg_score_corrected",
]
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


# --------------------------------------------------------------------------- text chunks
def chunk_text(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """Split ``text`` into chunks of whole sentences, each at most ``max_tokens`` tokens.

    Sentences are packed greedily in order; a sentence that alone is too long is split
    at word boundaries (a single word longer than the limit becomes its own chunk, and
    the text tower truncates it). Every word of ``text`` is in exactly one chunk, in order.
    """
    words_total = text.split()
    if not words_total:
        return [""]
    pieces: list[str] = []
    for sentence in _SENTENCE.split(text.strip()):
        if count_tokens(sentence) <= max_tokens:
            pieces.append(sentence)
            continue
        cur: list[str] = []
        for w in sentence.split():
            if cur and count_tokens(" ".join(cur + [w])) > max_tokens:
                pieces.append(" ".join(cur))
                cur = []
            cur.append(w)
        if cur:
            pieces.append(" ".join(cur))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and count_tokens(chunks[-1] + " " + piece) <= max_tokens:
            chunks[-1] = chunks[-1] + " " + piece
        else:
            chunks.append(piece)
    return chunks


class ClipScorer:
    """CLIP score with explicit long-prompt handling, on a :class:`curation.models.ClipModel`."""

    def __init__(self, clip, batch_size: int = 64):
        self.clip = clip
        self.batch_size = batch_size
        tok = clip.tokenizer
        self.context = int(getattr(tok, "context_length", 77))
        self.max_tokens = self.context - 2  # start and end tokens

    def count_tokens(self, text: str) -> int:
        """Text tokens (without start/end) the way the model's tokenizer counts them, uncut."""
        tok = self.clip.tokenizer
        if hasattr(tok, "encode"):  # open_clip's SimpleTokenizer (OpenAI CLIP's BPE)
            return len(tok.encode(text))
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        if inner is not None:
            return len(inner(text, add_special_tokens=False, truncation=False)["input_ids"])
        raise TypeError(f"cannot count tokens with {type(tok).__name__}; chunking needs an uncut token count")

    def chunks(self, text: str) -> list[str]:
        return chunk_text(text, self.count_tokens, self.max_tokens)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        out = [self.clip.encode_texts(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.clip.embed_dim), np.float32)

    def score(self, image_emb: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunked score, truncated score, chunk counts) for each image and its prompt, x100."""
        chunk_lists = [self.chunks(p) for p in prompts]
        flat = [c for cl in chunk_lists for c in cl]
        owner = np.repeat(np.arange(len(prompts)), [len(cl) for cl in chunk_lists])
        text_emb = self._encode_texts(flat)
        cos = np.einsum("nd,nd->n", image_emb[owner], text_emb)
        chunked = np.bincount(owner, weights=cos, minlength=len(prompts)) / np.maximum(
            np.bincount(owner, minlength=len(prompts)), 1
        )
        truncated = np.einsum("nd,nd->n", image_emb, self._encode_texts(list(prompts)))
        return 100 * chunked, 100 * truncated, np.array([len(c) for c in chunk_lists])


# --------------------------------------------------------------------------- FID
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which ``eigh`` computes stably (no
    complex parts to discard, unlike ``scipy.linalg.sqrtm`` on S1 S2).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets held in memory (rows are images); each needs at least 2 rows."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


class FeatureStats:
    """Mean and covariance of feature rows, accumulated batch by batch in float64.

    Memory is one batch plus a d x d matrix, whatever the number of images. Batches
    are merged with the pairwise update of Chan, Golub and LeVeque (1979): for a batch
    with ``n_b`` rows, mean ``m_b`` and centred sum of squares ``M_b``,
    ``M = M_a + M_b + d d^T n_a n_b / n`` with ``d = m_b - m_a``. Unlike summing raw
    ``x x^T``, it does not lose precision when the mean is large next to the spread.
    ``cov()`` equals ``np.cov(all_rows, rowvar=False)``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            return
        nb, mb = len(x), x.mean(0)
        centred = x - mb
        m2b = centred.T @ centred
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def cov(self) -> np.ndarray:
        return self.m2 / (self.n - 1)

    def to_bytes(self, **extra) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, n=self.n, mean=self.mean, m2=self.m2, **extra)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, doc) -> FeatureStats:
        out = cls()
        out.n, out.mean, out.m2 = int(doc["n"]), doc["mean"], doc["m2"]
        return out


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets; NaN when either has fewer than 2 images."""
    if a.n < 2 or b.n < 2:
        return float("nan")
    return frechet_distance(a.mean, a.cov(), b.mean, b.cov())


def stream_stats(
    items: list,
    load: Callable[[object], object],
    extract: Callable[[list], np.ndarray],
    batch_size: int,
    on_error: Callable[[object, Exception], None] | None = None,
) -> FeatureStats:
    """Features of ``items`` accumulated ``batch_size`` images at a time.

    ``load(item)`` decodes one image; at most one batch of decoded images exists at a
    time. An item that fails to load is passed to ``on_error`` (counted by the caller)
    and skipped.
    """
    stats = FeatureStats()
    for start in range(0, len(items), batch_size):
        batch = []
        for item in items[start : start + batch_size]:
            try:
                batch.append(load(item))
            except Exception as exc:  # noqa: BLE001 - an unreadable image is counted, not fatal
                if on_error is None:
                    raise
                on_error(item, exc)
        if batch:
            stats.update(extract(batch))
        del batch
    return stats


class InceptionFeatures:
    """torchvision Inception-v3 pool features (2048-d) from a local state dict."""

    def __init__(self, weights: str, device: str = "cpu"):
        import torch
        import torchvision

        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = device

    def __call__(self, images: list) -> np.ndarray:
        import torch

        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB").resize((299, 299)), dtype=np.float32) / 255).permute(
                    2, 0, 1
                )
                for im in images
            ]
        )
        with torch.inference_mode():
            return self.model(((x - mean) / std).to(self.device)).float().cpu().numpy()


# --------------------------------------------------------------------------- preference models
def _load_preference(pcfg, device: str) -> tuple[dict[str, Callable[[list, list[str]], np.ndarray]], dict[str, str]]:
    """The preference scorers that can run here, and a note for each that cannot."""
    import importlib.util

    scorers: dict[str, Callable] = {}
    notes: dict[str, str] = {}
    if pcfg.imagereward:
        if importlib.util.find_spec("ImageReward") is None:
            notes["imagereward"] = "skipped: package not installed (pip install image-reward)"
        else:
            import ImageReward as RM  # noqa: N814

            rm = RM.load(pcfg.imagereward, device=device)
            scorers["imagereward"] = lambda ims, ps: np.array(
                [float(rm.score(p, [im])) for im, p in zip(ims, ps, strict=True)]
            )
    else:
        notes["imagereward"] = "not configured (eval.metrics.preference.imagereward)"
    if pcfg.hpsv2:
        if importlib.util.find_spec("hpsv2") is None:
            notes["hpsv2"] = "skipped: package not installed (pip install hpsv2)"
        else:
            import hpsv2

            scorers["hpsv2"] = lambda ims, ps: np.array(
                [
                    float(np.ravel(hpsv2.score([im], p, hps_version=pcfg.hpsv2))[0])
                    for im, p in zip(ims, ps, strict=True)
                ]
            )
    else:
        notes["hpsv2"] = "not configured (eval.metrics.preference.hpsv2)"
    if pcfg.pickscore:
        scorers["pickscore"] = PickScore(pcfg.pickscore, pcfg.pickscore_processor or pcfg.pickscore, device)
    else:
        notes["pickscore"] = "not configured (eval.metrics.preference.pickscore)"
    return scorers, notes


class PickScore:
    """PickScore (Kirstain et al. 2023): logit_scale x cosine of a fine-tuned CLIP-H's
    embeddings (``yuvalkirstain/PickScore_v1`` with the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
    processor), through transformers' ``CLIPModel``. Prompts past 77 tokens are truncated,
    as in the original."""

    def __init__(self, model: str, processor: str, device: str = "cpu"):
        from transformers import AutoModel, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.device = device

    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            im = self.processor(images=images, return_tensors="pt").to(self.device)
            tx = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(
                self.device
            )
            ie = self.model.get_image_features(**im)
            te = self.model.get_text_features(**tx)
            ie = getattr(ie, "pooler_output", ie)
            te = getattr(te, "pooler_output", te)
            ie = ie / ie.norm(dim=-1, keepdim=True)
            te = te / te.norm(dim=-1, keepdim=True)
            return (self.model.logit_scale.exp() * (ie * te).sum(-1)).float().cpu().numpy()


# --------------------------------------------------------------------------- aggregation
def aggregate(rows: list[dict], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """Mean and bootstrap CI of every metric per model x prompt set x category (and ``ALL``)."""
    import pandas as pd

    if not rows:
        return []
    df = pd.DataFrame(rows)
    df = df[df["error"].isna()] if "error" in df else df
    out = []
    for (model, ps), g in df.groupby(["model", "prompt_set"], sort=True):
        groups = [("ALL", g)] + sorted(
            ((str(c), gc) for c, gc in g.groupby("category", dropna=False)), key=lambda x: x[0]
        )
        for category, gc in groups:
            rec = {
                "model": model,
                "prompt_set": ps,
                "category": category,
                "n_images": len(gc),
                "n_prompts": int(gc["prompt_id"].nunique()),
            }
            for m in METRIC_COLUMNS:
                if m in gc and gc[m].notna().any():
                    e = bootstrap_mean(
                        gc[m].to_numpy(dtype=float), gc["prompt_id"].to_numpy(), n_boot, confidence, seed
                    )
                    rec[m] = {"mean": e.mean, "ci_low": e.low, "ci_high": e.high, "n_prompts": e.n_prompts}
            out.append(rec)
    return out


# --------------------------------------------------------------------------- the stage
def _open_image(root: Table, rel: str):
    from PIL import Image

    with root.fs.open(f"{root.path}/{rel}", "rb") as f:
        im = Image.open(f)
        im.load()
    return im.convert("RGB")


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _load_rgb(path) -> object:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def reference_stats(
    folder: str,
    extract: Callable[[list], np.ndarray],
    extractor_id: str,
    batch_size: int,
    cache: Table | None,
    summary: StageSummary,
) -> tuple[FeatureStats, bool]:
    """Feature statistics of a reference folder, streamed, and cached per reference set.

    The cache key is ``extractor_id`` (which must fingerprint the extractor's weights:
    :func:`eval.fingerprint.weights_fingerprint`) plus every file's relative path and
    content hash (:func:`eval.fingerprint.files_digest`, not size and modification
    time), so adding, removing or changing a reference image, or new weights, computes
    the statistics again. Returns the statistics and whether they came from the cache.
    """
    import hashlib

    from eval.fingerprint import files_digest

    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"eval.metrics.fid_reference {folder!r} holds no .png/.jpg/.jpeg/.webp images")
    key = hashlib.sha256(f"{extractor_id}\0{files_digest(files, root)}".encode()).hexdigest()
    name = f"_fid_reference/{key[:32]}.npz"
    if cache is not None and cache.fs.exists(f"{cache.path}/{name}"):
        with cache.fs.open(f"{cache.path}/{name}", "rb") as f:
            doc = np.load(f)
            stats = FeatureStats.from_npz(doc)
            unreadable = int(doc["unreadable"])
        if unreadable:
            summary.reject("fid_reference_unreadable", unreadable)
        return stats, True
    bad = []
    stats = stream_stats(files, _load_rgb, extract, batch_size, on_error=lambda item, exc: bad.append(item))
    if bad:
        summary.reject("fid_reference_unreadable", len(bad))
        log.warning("%d unreadable reference image(s), e.g. %s", len(bad), bad[0])
    if cache is not None and stats.n:
        cache.write_file(name, stats.to_bytes(unreadable=len(bad), files=len(files)))
    return stats, False


def run_metrics(cfg: RootConfig, args: argparse.Namespace) -> int:
    """The `eval` command (metrics)."""
    from curation.models import load_aesthetic, load_clip

    mcfg = cfg.eval.metrics
    images = Table(images_url(cfg), schema=EVAL_IMAGES)
    if not images.done_shards():
        raise ConfigError(f"no generated images in {images.url}: run `make eval-generate` first")
    table = Table(metrics_url(cfg), schema=EVAL_METRICS)
    table.clean_tmp()
    dpg_sets = set(dpg_prompt_sets(cfg)) if mcfg.dpg.questions else set()

    def needs_scoring(shard: str) -> bool:
        if shard not in table.done_shards():
            return True
        # a shard scored before its DPG-Bench answers were all there is scored again (CLIP is cheap)
        return (
            bool(dpg_sets)
            and _shard_prompt_set(images, shard) in dpg_sets
            and table.marker(shard).get("dpg") != "complete"
        )

    todo = sorted(s for s in images.done_shards() if needs_scoring(s))
    summary = StageSummary(STAGE)
    summary.skipped_done = len(images.done_shards()) - len(todo)
    clip = load_clip(mcfg.clip_model, mcfg.clip_pretrained, device=mcfg.device, precision=mcfg.precision)
    scorer = ClipScorer(clip, mcfg.batch_size)
    long_scorer = None
    if mcfg.long_clip_model:
        long_scorer = ClipScorer(
            load_clip(mcfg.long_clip_model, None, device=mcfg.device, precision=mcfg.precision), mcfg.batch_size
        )
    aesthetic = None
    if mcfg.aesthetic:
        aesthetic = load_aesthetic(mcfg.aesthetic, device=mcfg.device)
        if aesthetic.input_size != clip.embed_dim:
            raise ConfigError(
                f"eval.metrics.aesthetic expects {aesthetic.input_size}-d CLIP embeddings but "
                f"eval.metrics.clip_model gives {clip.embed_dim}-d (the LAION predictor needs ViT-L-14)"
            )
    pref, notes = _load_preference(mcfg.preference, str(clip.device))
    announce(
        STAGE,
        {
            "images": f"{images.url} ({len(images.done_shards())} shards, {len(todo)} to score)",
            "clip": f"{mcfg.clip_model} (context {scorer.context} tokens; longer prompts: sentence chunks averaged)",
            "long-clip": mcfg.long_clip_model or "not configured",
            "aesthetic": mcfg.aesthetic or "not configured",
            "preference": ", ".join(pref) or "none",
            "fid": f"{mcfg.fid_features} features vs {mcfg.fid_reference}" if mcfg.fid_reference else "not configured",
            "dpg-bench": (
                f"judge {mcfg.dpg.judge} on {sorted(dpg_sets)}, questions {mcfg.dpg.questions}"
                if dpg_sets
                else "not configured (eval.metrics.dpg.questions)"
            ),
            "output": table.url,
        },
    )
    dpg = judge_dpg(cfg, images, summary) if dpg_sets else None
    if dpg is not None:
        table.save_json("_dpg.json", dpg.doc)
        summary.extra["dpg"] = "; ".join(
            f"{k}: {v['official']['score']:.2f} (corrected {v['corrected']['score']:.2f})"
            for k, v in dpg.doc["results"].items()
            if v["official"]["score"] is not None and v["corrected"]["score"] is not None
        )
    table.save_config(cfg, STAGE, mcfg)
    total = sum(int(images.marker(s)["rows"]) for s in todo)
    with progress(range(total), total=total, desc=STAGE, unit="img") as bar:
        for shard in todo:
            rows = pq.read_table(images.shard_file(shard), filesystem=images.fs).to_pylist()
            dpg_complete = dpg is None or dpg.complete(r["key"] for r in rows)
            out_rows = []
            for start in range(0, len(rows), mcfg.batch_size):
                batch = rows[start : start + mcfg.batch_size]
                ok, ims = [], []
                for r in batch:
                    summary.n_in += 1
                    base = {k: r[k] for k in ("key", "model", "prompt_set", "prompt_id", "category", "seed")}
                    if r.get("error") or not r.get("image_path"):
                        summary.reject("no_image")
                        out_rows.append({**base, "error": f"no image: {r.get('error')}"})
                        continue
                    try:
                        ims.append(_open_image(images, r["image_path"]))
                        ok.append(base | {"prompt": r["prompt"]})
                    except Exception as exc:  # noqa: BLE001 - counted per image
                        summary.reject("image_unreadable")
                        out_rows.append({**base, "error": f"unreadable: {exc}"[:300]})
                if ok:
                    prompts = [o.pop("prompt") for o in ok]
                    emb = clip.encode_pil(ims)
                    cs, ct, nc = scorer.score(emb, prompts)
                    cols = {"clip_score": cs, "clip_score_truncated": ct, "clip_chunks": nc}
                    if long_scorer is not None:
                        cols["long_clip_score"] = long_scorer.score(long_scorer.clip.encode_pil(ims), prompts)[0]
                    if aesthetic is not None:
                        cols["aesthetic"] = aesthetic.score(emb)
                    for name, fn in pref.items():
                        cols[name] = fn(ims, prompts)
                    for i, o in enumerate(ok):
                        scores = dpg.scores.get(o["key"], (None, None)) if dpg is not None else (None, None)
                        out_rows.append(
                            o
                            | {k: (int(v[i]) if k == "clip_chunks" else float(v[i])) for k, v in cols.items()}
                            | {"dpg_score": scores[0], "dpg_score_corrected": scores[1]}
                        )
                    summary.n_out += len(ok)
                bar.update(len(batch))
            table.write_shard(
                shard,
                rows_to_table(out_rows, EVAL_METRICS),
                meta={"dpg": "complete" if dpg_complete else "partial"} if dpg_sets else None,
            )
    all_rows = table.read().to_pylist()
    agg = aggregate(all_rows, mcfg.bootstrap, seed=cfg.project.seed)
    table.save_json(
        "_aggregate.json",
        {
            "confidence": 0.95,
            "bootstrap": mcfg.bootstrap,
            "ci_method": "percentile, cluster bootstrap over prompts",
            "clip_score_note": "100 x cosine; prompts over the context are split into "
            "sentence chunks and the chunk scores averaged",
            "preference_notes": notes,
            "rows": agg,
        },
    )
    if mcfg.fid_reference:
        fid = compute_fid(cfg, images, clip, summary, cache=table)
        table.save_json("_fid.json", fid)
        summary.extra["fid"] = "; ".join(f"{k}: {v['fid']:.2f}" for k, v in fid["results"].items())
    summary.extra["preference"] = "; ".join(f"{k}: {v}" for k, v in notes.items()) or "all configured ran"
    summary.finish()
    table.save_json("_summary.json", summary.to_dict())
    summary.print()
    return 0


def compute_fid(cfg: RootConfig, images: Table, clip, summary: StageSummary, cache: Table | None = None) -> dict:
    """FID of every model x prompt set against the reference folder.

    Images are decoded and turned into features one batch (``eval.metrics.batch_size``)
    at a time, so memory is bounded by the batch, not the set; the reference
    statistics are cached in ``cache`` (the metrics table folder) per reference set.
    """
    from eval.fingerprint import weights_fingerprint

    mcfg = cfg.eval.metrics
    if mcfg.fid_features == "inception":
        if not mcfg.fid_inception_weights:
            raise ConfigError(
                "eval.metrics.fid_features=inception needs eval.metrics.fid_inception_weights (a local "
                "torchvision inception_v3 state dict)"
            )
        extract = InceptionFeatures(mcfg.fid_inception_weights, str(clip.device))
        extractor_id = f"inception-v3:{weights_fingerprint(mcfg.fid_inception_weights)}"
    else:

        def extract(ims: list) -> np.ndarray:
            return clip.encode_pil(ims)

        # the weights' content (local files) or the loaded parameters (a hub name), never the name alone
        weights = weights_fingerprint(mcfg.clip_model, mcfg.clip_pretrained, module=clip.model)
        extractor_id = f"clip:{mcfg.clip_model}:{mcfg.clip_pretrained}:{mcfg.precision}:{weights}"
    ref, cached = reference_stats(mcfg.fid_reference, extract, extractor_id, mcfg.batch_size, cache, summary)
    rows = [
        r
        for r in images.read(columns=["model", "prompt_set", "image_path", "error"]).to_pylist()
        if not r["error"] and r["image_path"]
    ]
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(f"{r['model']}/{r['prompt_set']}", []).append(r["image_path"])
    results = {}
    for name, paths in progress(sorted(groups.items()), desc="fid", unit="set"):

        def unreadable(item, exc, name=name) -> None:
            summary.reject("fid_image_unreadable")
            log.warning("FID %s: cannot read %s (%s)", name, item, exc)

        stats = stream_stats(paths, lambda p: _open_image(images, p), extract, mcfg.batch_size, unreadable)
        results[name] = {"fid": fid_from_stats(stats, ref), "n_images": stats.n, "n_reference": ref.n}
    return {
        "features": mcfg.fid_features,
        "reference": mcfg.fid_reference,
        "reference_cached": cached,
        "results": results,
        "note": "not comparable with papers' TF-Inception FID; few images make FID biased upward",
    }


def _shard_prompt_set(images: Table, shard: str) -> str | None:
    """The prompt set of an eval_images shard (from its marker; older shards: from the rows)."""
    ps = images.marker(shard).get("prompt_set")
    if ps is None:
        col = pq.read_table(images.shard_file(shard), filesystem=images.fs, columns=["prompt_set"]).column(0)
        ps = col[0].as_py() if len(col) else None
    return ps


def load_metrics_json(cfg: RootConfig, name: str) -> dict | None:
    return Table(metrics_url(cfg)).load_json(name)
