"""``paradiffusion cache-text --stage N``: the frozen LLM's states of a stage's captions, computed once.

In stages 1 and 3 the LLM is frozen, so its ``last_hidden_state`` for a caption is the
same at every step. This table holds it per caption text (every caption of every usable
key: a key of ParaImage-Small may have several approved texts), plus the empty prompt
(caption dropout) and the validation prompts. A stage with ``data.text_cache`` set reads
it and does not load the LLM at all (13.5 GB of weights and its forward pass at 7B).

What is stored, and why. With ``masked`` conditioning the UNet sees only the caption's own
tokens (the padding is masked out), so a row holds those: ``n_tokens`` x hidden. With
``release`` conditioning (the default) every caption is padded with EOS to ``max_length``
and the UNet attends to the padding too. The LLM's states at those EOS positions are not a
constant that could be added back: under causal attention each padding position attends to
the caption's tokens, so its state depends on the caption (``tests/training/
test_text_cache.py`` checks it). Rebuilding them would need the LLM's keys and values of
every layer, far more than the states themselves. So a ``release`` row holds the whole
padded sequence, ``max_length`` x hidden, as the UNet saw it: at Llama-2-7B's 4096 in bf16,
8 KiB a token, 2 MiB a caption at 256 tokens, 4 MiB at 512 (stage 3: 3,100 images x ~2
texts x 4 MiB = 25 GB; twice that in fp32). The states are kept in ``train.model.llm_dtype``
(fp32 by default: what the release samples with), computed as the stage would (the LLM loaded
in that dtype, the stage-2 LoRA merged for stage 3), so a stage trained from the cache computes
the same loss as one that runs the LLM and samples from the same states (tests check both).

Layout: a ``Table`` (``part-*.parquet`` + commit markers) of rows ``text_hash`` (sha256 of
the caption's UTF-8 text), ``n_tokens``, ``length`` (positions stored), ``states`` (C-order
bytes), row groups of about 4 MiB so a reader fetches one caption without reading its
neighbours; ``_text_cache.json`` records what the states depend on: the LLM (id or path,
revision, a digest of its files), the stage-2 LoRA merged in (sha256 of its files; stage
3), ``max_length``, conditioning, dtype. Training on a cache made with other settings, or
missing a caption the stage trains on, stops with a message naming the setting. A rerun of
``cache-text`` computes only the captions not yet in a committed shard, so a killed run
loses at most the shard it was writing, and captions added later (new approved texts) are
added by running it again.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce, progress
from paradiffusion.storage import Table, join

log = get_logger("training.text_cache")

TEXT_CACHE = pa.schema(
    [
        pa.field("text_hash", pa.string(), nullable=False),  # sha256 hex of the caption's UTF-8 text
        pa.field("n_tokens", pa.int32()),  # the caption's tokens (BOS included, cut at max_length)
        pa.field("length", pa.int32()),  # positions stored: max_length (release) or n_tokens (masked)
        pa.field("states", pa.binary()),  # (length, hidden) in the cache's dtype, C order
    ]
)
SETTINGS_FILE = "_text_cache.json"
FORMAT = 1
#: Row groups of about this many bytes: a reader fetches one caption's group, not a whole shard.
ROW_GROUP_BYTES = 4 << 20
#: A shard is cut after about this many bytes of states (a killed run redoes at most one).
SHARD_BYTES = 512 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HASHED_WHOLE = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
#: Recorded settings checked before training -> (the config key that sets them, what to say).
_CHECKED = {
    "llm": "train.model.llm",
    "llm_revision": "train.model.llm_revision",
    "llm_files": "train.model.llm (its weight or tokenizer files changed)",
    "lora_sha256": "train.stage{n}.init_from (the stage-2 LoRA merged into the LLM)",
    "max_length": "train.stage{n}.max_length",
    "conditioning": "train.model.conditioning",
    "dtype": "train.model.llm_dtype (the dtype the LLM computes text states in)",
}


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_cache_path(cfg: RootConfig, stage: int) -> str:
    return cfg.train.stage(stage).data.text_cache or join(cfg.project.data_root, "text_cache", f"stage{stage}")


def llm_dtype(cfg: RootConfig) -> torch.dtype:
    """The dtype the LLM computes text states in, in training, here and in ``generate``: ``train.model.llm_dtype``."""
    return getattr(torch, cfg.train.model.llm_dtype)


def _model_folder(path: str, revision: str | None) -> Path | None:
    """The local folder of a model id or path (the Hub cache's snapshot), or None when not on this machine."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    try:
        from transformers.utils import cached_file

        f = cached_file(
            path, "config.json", revision=revision, local_files_only=True, _raise_exceptions_for_missing_entries=False
        )
    except Exception:  # noqa: BLE001 - not cached, offline: the caller says what it checks instead
        return None
    return Path(f).parent if f else None


def files_digest(path: str, revision: str | None = None) -> str | None:
    """A digest of a model folder: config and tokenizer files whole; each weight file's name,
    size and 16 evenly spaced 64 KiB samples (cheap on a 13 GB model, and any retrained or
    replaced weights change it). None when the model is not on this machine."""
    folder = _model_folder(path, revision)
    if folder is None:
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if f.name in _HASHED_WHOLE:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.name.endswith(_WEIGHT_SUFFIXES):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            chunk = 64 << 10
            with open(f, "rb") as fh:
                for i in range(16):
                    fh.seek(max(0, (size - chunk) * i // 15))
                    h.update(fh.read(chunk))
    return h.hexdigest()


def lora_digest(lora_dir: str | Path | None) -> str | None:
    """sha256 over every file of a LoRA folder (the adapter weights and config); None without one."""
    if lora_dir is None:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(lora_dir).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(lora_dir)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def stage_lora_dir(cfg: RootConfig, stage: int) -> Path | None:
    """The LoRA a frozen stage merges into its LLM: ``<init_from>/text_encoder_lora`` (stage 3)."""
    from training.modeling import LORA_DIR
    from training.trainer import stage_paths

    init = stage_paths(cfg, stage)["init_from"]
    if cfg.train.stage(stage).train_lora or not init:
        return None
    d = Path(init) / LORA_DIR
    return d if d.is_dir() else None


def cache_key(cfg: RootConfig, stage: int, dtype: torch.dtype) -> dict:
    """What a stage's cached states depend on, found without loading the LLM."""
    mc, sc = cfg.train.model, cfg.train.stage(stage)
    lora = stage_lora_dir(cfg, stage)
    return {
        "llm": mc.llm,
        "llm_revision": mc.llm_revision,
        "llm_files": files_digest(mc.llm, mc.llm_revision),
        "lora": str(lora) if lora else None,
        "lora_sha256": lora_digest(lora),
        "max_length": sc.max_length,
        "conditioning": mc.conditioning,
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_cache(have: dict | None, want: dict, url: str, stage: int) -> None:
    """Stop (ConfigError naming the setting) when the cache at ``url`` was made with other settings."""
    remake = f"or make a new cache: `make cache-text STAGE={stage}` with train.stage{stage}.data.text_cache set to another folder"
    if have is None:
        raise ConfigError(
            f"train.stage{stage}.data.text_cache = {url}: no text cache there ({SETTINGS_FILE} missing); run "
            f"`make cache-text STAGE={stage}` first"
        )
    for k, setting in _CHECKED.items():
        a, b = have.get(k), want.get(k)
        if k == "llm_files" and (a is None or b is None):
            if b is None:  # the trainer does not need the LLM here: it may not be on this machine
                log.info("the LLM is not on this machine: the text cache's LLM is checked by id and revision only")
            continue
        if a != b:
            shown = (a, b) if k not in ("llm_files", "lora_sha256") else (f"{str(a)[:12]}...", f"{str(b)[:12]}...")
            raise ConfigError(
                f"{setting.format(n=stage)}: the text cache {url} was made with {shown[0]}, this run has {shown[1]}; "
                f"set it back, {remake}"
            )


class TextCache:
    """A committed text cache, read by caption: an index ``hash -> (file, row group, row)``
    held in NumPy arrays (shared by forked loader processes without being copied) and the
    states read on demand, a row group at a time (the last few kept), files opened per process."""

    def __init__(self, url: str):
        self.url = url
        table = Table(url)
        self.settings = table.load_json(SETTINGS_FILE) if table.exists() else None
        if self.settings is None:
            raise ConfigError(
                f"no text cache at {url} (no {SETTINGS_FILE}); run `make cache-text STAGE=N` for the stage first"
            )
        self.fs = table.fs
        self.files = [table.shard_file(s) for s in sorted(table.done_shards())]
        self.hidden_size = int(self.settings["hidden_size"])
        self.conditioning = self.settings["conditioning"]
        self.max_length = int(self.settings["max_length"])
        self.dtype = getattr(torch, self.settings["dtype"])
        words, where = [], []
        for fi, f in enumerate(self.files):
            with self.fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.metadata.num_row_groups):
                    hashes = pf.read_row_group(g, columns=["text_hash"])["text_hash"].to_pylist()
                    words += [int(h[:16], 16) for h in hashes]
                    where += [(fi, g, i) for i in range(len(hashes))]
        order = np.argsort(np.array(words, dtype=np.uint64), kind="stable")
        self._words = np.array(words, dtype=np.uint64)[order]
        self._where = np.array(where, dtype=np.int32).reshape(-1, 3)[order]
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._words)

    def _find(self, h: str) -> int:
        w = np.uint64(int(h[:16], 16))
        i = int(np.searchsorted(self._words, w))
        return i if i < len(self._words) and self._words[i] == w else -1

    def missing(self, texts) -> list[str]:
        """The texts (of ``texts``) that have no row in the cache."""
        return [t for t in texts if self._find(text_hash(t)) < 0]

    def _group(self, fi: int, g: int) -> dict:
        if self._pid != os.getpid():  # a new (forked) process: its own file handles and cache
            self._pid, self._open, self._groups = os.getpid(), {}, OrderedDict()
            # ...and its own filesystem object: an object store's client (s3fs) refuses to run after a
            # fork; fsspec's instance cache gives a fresh one in a new process
            self.fs = Table(self.url).fs
        if (fi, g) not in self._groups:
            if fi not in self._open:
                self._open[fi] = pq.ParquetFile(self.fs.open(self.files[fi], "rb"))
            t = self._open[fi].read_row_group(g)
            self._groups[(fi, g)] = {c: t[c].to_pylist() for c in ("text_hash", "n_tokens", "length", "states")}
            while len(self._groups) > 8:
                self._groups.popitem(last=False)
        self._groups.move_to_end((fi, g))
        return self._groups[(fi, g)]

    def states(self, text: str) -> tuple[torch.Tensor, int]:
        """``(states (length, hidden), n_tokens)`` of one text; KeyError when it is not cached."""
        h = text_hash(text)
        i = self._find(h)
        if i < 0:
            raise KeyError(f"{text[:60]!r} is not in the text cache {self.url}")
        fi, g, row = (int(v) for v in self._where[i])
        grp = self._group(fi, g)
        if grp["text_hash"][row] != h:  # two hashes with the same first 64 bits: never seen, but never wrong
            raise KeyError(f"text cache {self.url}: index collision for {h}")
        length = grp["length"][row]
        x = torch.frombuffer(bytearray(grp["states"][row]), dtype=self.dtype).view(length, self.hidden_size)
        return x, int(grp["n_tokens"][row])

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """``(states (B, L, hidden), n_tokens)`` as the UNet reads them: ``release``: every row
        ``max_length`` long, padding states included; ``masked``: zero-padded to the longest
        (the UNet's mask hides the padding, so its values do not matter)."""
        got = [self.states(t) for t in texts]
        width = max(x.shape[0] for x, _ in got)
        out = torch.zeros(len(got), width, self.hidden_size, dtype=self.dtype)
        for i, (x, _) in enumerate(got):
            out[i, : x.shape[0]] = x
        return out, [n for _, n in got]


def condition_from_cache(
    states: torch.Tensor,
    lengths: list[int],
    drop: np.ndarray,
    empty: tuple[torch.Tensor, int],
    conditioning: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's text input of a batch from cached states, with the dropped captions (``drop``)
    replaced by the cached empty prompt (``empty``: its states and token count): ``(states,
    attention mask)``. With ``masked`` conditioning the batch is cut to its longest remaining
    caption, as tokenizing the batch with those captions replaced by "" would pad it.

    ``states`` may be on the device; ``lengths`` and ``drop`` are host values, and so is all
    the arithmetic here: nothing waits for the device.
    """
    n = np.where(drop, empty[1], np.asarray(lengths))
    width = states.shape[1] if conditioning == "release" else int(n.max())
    states = states[:, :width]
    dev = states.device
    if drop.any():
        e = torch.zeros(1, width, states.shape[2], dtype=states.dtype, device=dev)
        k = min(width, empty[0].shape[0])
        e[0, :k] = empty[0][:k].to(dev, non_blocking=True)
        where = torch.from_numpy(drop.copy()).to(dev, non_blocking=True)[:, None, None]
        states = torch.where(where, e, states)
    mask = torch.from_numpy((np.arange(width)[None, :] < n[:, None]).astype(np.int64))
    return states, mask


# ---------------------------------------------------------------------------- cache-text
def cache_text(cfg: RootConfig, stage: int, batch_size: int = 16) -> StageSummary:
    """Compute the frozen LLM's states of every caption of the stage (and "" and the validation
    prompts) that the cache does not hold yet; one committed shard per images shard's new captions."""
    from training.data import BucketedImageData
    from training.modeling import load_frozen_llm, load_tokenizer, weights_fingerprint
    from training.trainer import fetch_init_from, stage_paths

    sc, mc = cfg.train.stage(stage), cfg.train.model
    if sc.train_lora:
        raise ConfigError(
            f"cache-text --stage {stage}: this stage trains the LLM's LoRA (train.stage{stage}.train_lora), so its "
            "text states change every step and cannot be cached; the cache is for stages 1 and 3"
        )
    paths = stage_paths(cfg, stage)
    fetch_init_from(paths, stage)  # the previous stage's export, when it is on object storage
    lora = stage_lora_dir(cfg, stage)
    if stage > 1 and paths["init_from"] and not Path(paths["init_from"], "unet").is_dir():
        raise ConfigError(
            f"train.stage{stage}.init_from = {paths['init_from']}: no export there; stage {stage}'s LLM has the "
            f"stage-{stage - 1} LoRA merged in, so train stage {stage - 1} first"
        )
    out = Table(text_cache_path(cfg, stage), TEXT_CACHE)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = llm_dtype(cfg)  # as the stage runs its LLM (training/trainer.py) and generate samples with it
    data = BucketedImageData(
        paths["images"], 1, sc.data.resolution, caption_source=sc.data.caption_source, captions_url=paths["captions"],
        caption_model_id=sc.data.caption_model_id, caption_prompt_id=sc.data.caption_prompt_id,
        scores_url=paths["scores"], bucket_step=sc.data.bucket_step, max_aspect_ratio=sc.data.max_aspect_ratio,
        num_workers=0, format=sc.data.format, subset=sc.data.subset,
    )  # fmt: skip
    summary = StageSummary(f"cache-text-stage{stage}")
    by_shard: dict[int, dict[str, str]] = {}
    for r in data.rows:
        by_shard.setdefault(r.shard, {}).update({text_hash(c): c for c in r.captions})
    prompts = {text_hash(p): p for p in ["", *sc.logging.validation_prompts]}
    want = cache_key(cfg, stage, dtype)
    done = out.done_shards()
    if done:  # adding to a cache: only with the settings it was made with
        check_cache(out.load_json(SETTINGS_FILE), want, out.url, stage)
    out.clean_tmp()
    have: set[str] = set()
    for _, t in out.iter_shards(columns=["text_hash"]):
        have.update(t["text_hash"].to_pylist())
    work: list[tuple[str, dict[str, str]]] = []
    for si, texts in sorted(by_shard.items()):
        new = {h: t for h, t in texts.items() if h not in have}
        have.update(new)
        if new:
            work.append((data.shards[si].rsplit("/", 1)[-1].removesuffix(".parquet"), new))
        else:
            summary.skipped_done += 1
    new_prompts = {h: t for h, t in prompts.items() if h not in have}
    if new_prompts:
        work.append(("prompts", new_prompts))
    n_texts = len({h for texts in by_shard.values() for h in texts} | set(prompts))
    summary.n_in = n_texts
    to_do = sum(len(t) for _, t in work)
    announce(
        summary.stage,
        {
            "captions": f"{sc.data.caption_source} {paths['captions'] or ''}: {len(data.rows)} keys, "
            f"{n_texts} distinct texts (with '' and the validation prompts), {to_do} to compute",
            "LLM": f"{mc.llm}{' + LoRA ' + str(lora) + ' merged' if lora else ''}, {dtype}, {device}",
            "stored": f"{mc.conditioning} conditioning: "
            + (f"every text padded to {sc.max_length} tokens" if mc.conditioning == "release" else "its own tokens"),
            "output": out.url,
        },
    )
    if data.counts.get("skipped: missing caption"):
        summary.reject("missing caption", data.counts["skipped: missing caption"])
    if not work:
        summary.extra["texts_cached_before"] = n_texts
        summary.finish()
        summary.print()
        return summary
    tokenizer = load_tokenizer(mc.llm, mc.llm_revision)
    llm = load_frozen_llm(mc.llm, mc.llm_revision, dtype, lora).to(device)
    settings = {
        "format": FORMAT,
        **want,
        "hidden_size": llm.config.hidden_size,
        "llm_fingerprint": weights_fingerprint(llm.parameters()),  # what a checkpoint records of the frozen LLM
    }
    out.save_config(cfg, summary.stage)
    out.save_json(SETTINGS_FILE, settings)
    row_bytes = (sc.max_length if mc.conditioning == "release" else 64) * llm.config.hidden_size * dtype.itemsize
    written = 0
    bar = progress(None, total=to_do, desc=summary.stage, unit="text")
    for name, texts in work:
        digest = hashlib.sha256("".join(sorted(texts)).encode()).hexdigest()[:12]
        items = sorted(texts.items(), key=lambda kv: len(kv[1]))  # similar lengths batch together (less padding)
        rows: list[dict] = []
        part = 0
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            rows += _encode(llm, tokenizer, chunk, sc.max_length, mc.conditioning, dtype, device)
            bar.update(len(chunk))
            if len(rows) * row_bytes >= SHARD_BYTES or i + batch_size >= len(items):
                written += _write(out, f"{name}-{digest}-{part:03d}", rows)
                part += 1
                rows = []
        summary.n_out += len(texts)
    bar.close()
    summary.extra.update(
        {
            "texts_cached_before": n_texts - to_do,
            "bytes_written": written,
            "bytes_per_text": round(written / max(1, to_do)),
            "dtype": settings["dtype"],
            "hidden_size": settings["hidden_size"],
        }
    )
    summary.finish()
    summary.print()
    out.save_json("_summary.json", summary.to_dict())
    return summary


def _encode(llm, tokenizer, chunk: list[tuple[str, str]], max_length: int, conditioning: str, dtype, device) -> list:
    """Rows of ``(hash, text)`` pairs: the LLM's last hidden states as the stage computes them."""
    from training.modeling import tokenize

    ids, mask = tokenize(tokenizer, [t for _, t in chunk], max_length, conditioning)
    with torch.no_grad():
        hidden = llm(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    hidden = hidden.to(dtype).cpu()
    rows = []
    for (h, _), x, m in zip(chunk, hidden, mask, strict=True):
        n = int(m.sum())
        keep = x if conditioning == "release" else x[:n]
        rows.append({"text_hash": h, "n_tokens": n, "length": keep.shape[0],
                     "states": keep.contiguous().view(torch.uint8).numpy().tobytes()})  # fmt: skip
    return rows


def _write(out: Table, shard: str, rows: list[dict]) -> int:
    """One committed shard, in row groups of about ROW_GROUP_BYTES; returns the bytes of states."""
    size = max(len(r["states"]) for r in rows)
    out.write_shard(
        shard, pa.Table.from_pylist(rows, schema=TEXT_CACHE), row_group_size=max(1, ROW_GROUP_BYTES // size)
    )
    return sum(len(r["states"]) for r in rows)
