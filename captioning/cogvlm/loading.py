"""Load an official CogVLM / CogVLM2 checkpoint (or one saved by us) into the native model, checked first.

Before any weight is read, the folder's parameter names (from ``model.safetensors.index.json``
or the single ``model.safetensors`` header) are compared with the names the native model
expects at the folder's ``config.json``, and every shard the index names must be there. A
missing shard, a missing parameter, an unexpected one or a shape that does not match stops
the load with a :class:`CheckpointError` naming the first offenders, instead of a half-random
model. A Hub id is first fetched to the local Hugging Face cache (config, index, shards).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from captioning.cogvlm.configuration import CogVLMConfig, config_class_for

#: Checkpoint entries the model recomputes and may ignore (older revisions saved rotary caches).
IGNORED = re.compile(r"rotary_emb\.(cos|sin)_cached$")
#: Model entries a checkpoint may leave out: the model computes them. A checkpoint without
#: ``rotary_emb.inv_freq`` gets the frequencies of its family's ``rope_theta`` (CogVLM 10000,
#: CogVLM2 500000, as the reference code's ``RotaryEmbedding`` computes them); one that stores
#: them must agree with that theta (:func:`check_rotary`), else it was made for another model.
OPTIONAL = re.compile(r"rotary_emb\.inv_freq$")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint folder does not hold the model its config.json describes."""


def _first(names: set[str] | list[str], n: int = 5) -> str:
    items = sorted(names)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def resolve_folder(model: str, revision: str | None = None) -> Path:
    """A local folder as is; a Hub id downloaded (config, tokenizer files, safetensors) to the HF cache."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    )


def read_config(folder: Path) -> CogVLMConfig:
    """The folder's ``config.json`` as a CogVLM or CogVLM2 config (chosen by its fields)."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    data = json.loads(cfg_file.read_text())
    return config_class_for(data).from_pretrained(str(folder))


def checkpoint_tensors(folder: Path) -> dict[str, tuple[int, ...] | None]:
    """Parameter name -> shape (from the safetensors headers) of the checkpoint in ``folder``.

    Raises :class:`CheckpointError` when the index names shard files that are not there.
    """
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: {len(missing)} of {len(shards)} shard(s) named in {INDEX} are missing: {_first(missing)}"
            )
    elif (folder / SINGLE).is_file():
        shards = [SINGLE]
    else:
        raise CheckpointError(f"{folder}: no {INDEX} and no {SINGLE} (only safetensors checkpoints are read)")
    shapes: dict[str, tuple[int, ...] | None] = {}
    for shard in shards:
        path = folder / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (no file name)
            raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
        short = _truncated(path)
        if short:
            raise CheckpointError(f"{path}: {short}. Fix: download the shard again")
    if index.is_file():
        listed = set(weight_map)
        if listed != set(shapes):
            raise CheckpointError(
                f"{folder}: {INDEX} and the shards disagree; in the index only: {_first(listed - set(shapes))}; "
                f"in the shards only: {_first(set(shapes) - listed)}"
            )
    return shapes


def _truncated(path: Path) -> str | None:
    """Why a safetensors file is shorter than its header says (safe_open reads only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated: its header needs {8 + n + end} bytes, the file has {size}"
    return None


def expected_tensors(config: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and persistent buffer the native model has at ``config`` (built on meta)."""
    import torch

    from captioning.cogvlm.modeling import CogVLMForCausalLM

    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint(folder: Path, config: CogVLMConfig) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped parameters,
    or a stored ``rotary_emb.inv_freq`` of another ``rope_theta`` (:func:`check_rotary`)."""
    have = {k: v for k, v in checkpoint_tensors(folder).items() if not IGNORED.search(k)}
    want = expected_tensors(config)
    missing = {k for k in want if k not in have and not OPTIONAL.search(k)}
    unexpected = {k for k in have if k not in want}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing parameter(s): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s): {_first(unexpected)}")
        kind = "CogVLM2" if config.is_cogvlm2 else "CogVLM"
        raise CheckpointError(f"{folder} does not match the {kind} its config.json describes: " + "; ".join(parts))
    bad = {k for k in want if k in have and have[k] is not None and tuple(have[k]) != want[k]}
    if bad:
        k = sorted(bad)[0]
        raise CheckpointError(
            f"{folder}: {len(bad)} parameter(s) with the wrong shape, first {k}: checkpoint {have[k]}, "
            f"config.json implies {want[k]}"
        )
    check_rotary(folder, config)


def _stored(folder: Path, pattern: re.Pattern) -> dict[str, Any]:
    """The checkpoint's tensors whose names match ``pattern`` (read from their shards only)."""
    from safetensors import safe_open

    index = folder / INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / SINGLE), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), SINGLE)  # noqa: SIM118 - safe_open is not a dict
    out: dict[str, Any] = {}
    for shard in sorted({v for k, v in weight_map.items() if pattern.search(k)}):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if pattern.search(k)})  # noqa: SIM118
    return out


def check_rotary(folder: Path, config: CogVLMConfig) -> None:
    """Raise :class:`CheckpointError` when a stored ``rotary_emb.inv_freq`` is not the family's ``rope_theta``'s.

    The stored buffer wins at load time, so a checkpoint made with another theta (or a config
    of the wrong family) would load and quietly rotate by other angles. Compared in the
    stored dtype (bf16 checkpoints round the buffer); the message names the theta the stored
    buffer implies (``inv_freq[1] = theta ** (-2 / head_dim)``) and the config's.
    """
    import torch

    from captioning.cogvlm.modeling import CogVLMRotaryEmbedding

    head_dim = config.hidden_size // config.num_attention_heads
    want = CogVLMRotaryEmbedding(head_dim, config.rope_theta).inv_freq
    for name, stored in sorted(_stored(folder, OPTIONAL).items()):
        expected = want.to(stored.dtype).float()
        eps = torch.finfo(stored.dtype).eps if stored.is_floating_point() else 0.0
        if stored.shape != want.shape or not torch.allclose(stored.float(), expected, rtol=2 * eps, atol=0.0):
            implied = float(stored.float()[1]) ** (-head_dim / 2) if stored.numel() > 1 else float("nan")
            kind = "CogVLM2" if config.is_cogvlm2 else "CogVLM"
            raise CheckpointError(
                f"{folder}: {name} implies rope_theta {implied:.6g}, but a {kind} config.json means rope_theta "
                f"{config.rope_theta:.6g}: the checkpoint was made for another model (or the config is of the "
                f"wrong family)"
            )


def load_model(
    model: str,
    revision: str | None = None,
    dtype: Any = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    device_map: Any = None,
):
    """The native :class:`~captioning.cogvlm.modeling.CogVLMForCausalLM` for a folder or Hub id, checked first."""
    from captioning.cogvlm.modeling import CogVLMForCausalLM

    folder = resolve_folder(model, revision)
    config = read_config(folder)
    check_checkpoint(folder, config)
    kwargs: dict[str, Any] = {"config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs["attn_implementation"] = attn_implementation or "sdpa"
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    return CogVLMForCausalLM.from_pretrained(str(folder), **kwargs).eval()
