"""What the filter records about its settings, and what a rerun with other settings may reuse.

Each measured shard's marker records the settings its numbers depend on
(:func:`measure_settings`) and the checks that decided it (:func:`check_settings`);
:func:`plan_measured` compares them with a new run's, so changed thresholds are
re-decided from the stored measurements (:func:`recheck`) and changed models or decode
settings are measured again (or refused, naming what changed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import FilterConfig
from curation.decode import REJECT_ANIMATED, REJECT_BOMB
from curation.filters import (
    REJECT_DOWNLOAD,
    REJECT_NSFW,
    REJECT_WATERMARK,
    cheap_filters,
    first_rejection,
    model_filters,
)
from curation.safety import SAFETY_REASONS
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.schemas import REJECT_DECODE
from paradiffusion.storage import Table

#: Reasons pass 1's decode gives; every other reason is re-decidable from the measurements.
#: The safety reasons of the lists and the input metadata are decided before decoding, too.
DECODE_REASONS = frozenset({REJECT_DOWNLOAD, REJECT_DECODE, REJECT_BOMB, REJECT_ANIMATED, *SAFETY_REASONS})
#: What pass 2 reads of a measured shard to re-apply changed checks.
_CHECK_COLUMNS = ["key", "reject_reason", "reject_detail", "width", "height", "caption", "language",
                  "language_score", "aesthetic", "clip_score", "nsfw", "watermark"]  # fmt: skip


def measure_settings(f: FilterConfig, image_size: int, lists: dict | None = None) -> dict:
    """What a measured row's numbers depend on: the models, the decode, the model input size, and
    the denylists / opt-out lists (``lists``: their fingerprint; absent when there are none)."""
    m = f.models
    out = {
        "models": {
            "clip_model": m.clip_model,
            "clip_pretrained": m.clip_pretrained,
            "aesthetic": m.aesthetic,
            **({"nsfw": m.nsfw} if m.nsfw else {}),  # absent when off: older records stay comparable
            **({"watermark": m.watermark} if m.watermark else {}),
            "precision": m.precision,
        },
        "decode": f.decode.model_dump(mode="json"),
        "image_size": image_size,
        "embeddings": f.save_embeddings or f.thresholds.dedup == "near",  # stored in the measured rows
    }
    if lists and (lists.get("denylists") or lists.get("opt_outs")):
        out["lists"] = lists
    return out


def check_settings(f: FilterConfig) -> dict:
    """The per-image checks (size, alt text, language, model scores): ``filter.thresholds``
    without the dedup keys."""
    return f.thresholds.model_dump(mode="json", exclude={"dedup", "near_dup_min"})


def decision_settings(f: FilterConfig, image_size: int, lists: dict | None = None) -> dict:
    """Everything that decides a final ``scores`` row: recorded in each shard's marker and
    fingerprinted in ``_config.yaml`` (so it never names settings that did not make the rows)."""
    return {
        "measure": measure_settings(f, image_size, lists),
        "checks": check_settings(f),
        "dedup": {
            "dedup": f.thresholds.dedup,
            "near_dup_min": f.thresholds.near_dup_min,
            **({"near_dup": f.near_dup.model_dump(mode="json")} if f.thresholds.dedup == "near" else {}),
        },
        "save_embeddings": f.save_embeddings,
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_SETTING_NAMES = {
    "lists": "download.denylists/opt_outs",
    "models": "filter.models",
    "decode": "filter.decode",
    "image_size": "CLIP input size",
}


def settings_diff(old: dict | None, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{setting: (old, new)}`` for what differs, with the config's key names."""
    if old is None:
        return {"settings": ("not recorded (measured by an older version)", "this run's")}
    a, b = _flat(old), _flat(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            top, _, rest = k.partition(".")
            name = prefix + k if prefix else _SETTING_NAMES.get(top, top) + (f".{rest}" if rest else "")
            out[name] = (a.get(k, "<unset>"), b.get(k, "<unset>"))
    return out


def _describe(diff: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    items = [f"{k} {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:limit]]
    return ", ".join(items) + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def recheck(rows: pa.Table, checks: FilterConfig) -> tuple[list, list, int]:
    """Re-apply this run's per-image checks to measured rows.

    Returns the new reasons and details and how many rows would now pass the cheap
    checks but were never scored by the models (they were rejected before the model
    stage when measured): those rows need measuring again.
    """
    cheap, model = cheap_filters(checks.thresholds), model_filters(checks.thresholds)
    d = rows.select(_CHECK_COLUMNS).to_pydict()
    reasons, details = list(d["reject_reason"]), list(d["reject_detail"])
    unscored = 0
    for i in range(rows.num_rows):
        scored = {REJECT_NSFW: d["nsfw"][i], REJECT_WATERMARK: d["watermark"][i]}.get(reasons[i])
        if reasons[i] in DECODE_REASONS and scored is None:
            continue  # decided before the models (an NSFW head's verdict is re-decided from its score)
        row = {k: d[k][i] for k in _CHECK_COLUMNS}
        rej = first_rejection(cheap, row)
        if rej is None:
            if row["clip_score"] is None:
                unscored += 1
                continue
            rej = first_rejection(model, row)
        reasons[i], details[i] = rej if rej is not None else (None, None)
    return reasons, details, unscored


def read_measured(work: Table, shard: str, columns: list[str]) -> pa.Table:
    """``columns`` of a measured shard; a column the shard was written without (added to the
    schema since, like ``nsfw``) comes back as nulls."""
    from paradiffusion.schemas import SCORES

    path = work.shard_file(shard)
    have = set(pq.read_schema(path, filesystem=work.fs).names)
    t = pq.read_table(path, filesystem=work.fs, columns=[c for c in columns if c in have])
    for c in columns:
        if c not in have:
            t = t.append_column(SCORES.field(c), pa.nulls(t.num_rows, SCORES.field(c).type))
    return t.select(columns)


@dataclass
class MeasurePlan:
    """Which measured shards this run can use as they are, re-decide, or must measure again."""

    recheck: set[str]  # measured with other checks: re-decided from their measurements
    stale: dict[str, str]  # shard -> why its measurements cannot serve this run


def plan_measured(work: Table, cfg: RootConfig, image_size: int, lists: dict | None = None) -> MeasurePlan:
    """Compare every measured shard's recorded settings with this run's."""
    f = cfg.filter
    want_m, want_c = measure_settings(f, image_size, lists), check_settings(f)
    plan = MeasurePlan(set(), {})
    need_emb = want_m.pop("embeddings")
    for shard, marker in work.markers().items():
        rec = marker.get("settings")
        old_m = dict(rec["measure"]) if rec else None
        had_emb = old_m.pop("embeddings", True) if old_m else False
        diff = settings_diff(old_m, want_m)
        if diff:
            plan.stale[shard] = _describe(diff)
            continue
        if need_emb and not had_emb:
            plan.stale[shard] = "image embeddings were not stored (dedup: near and save_embeddings need them)"
            continue
        if rec.get("checks") == want_c:
            continue
        rows = read_measured(work, shard, _CHECK_COLUMNS)
        _, _, unscored = recheck(rows, f)
        if unscored:
            diff = settings_diff(rec.get("checks"), want_c, prefix="filter.thresholds.")
            plan.stale[shard] = f"{_describe(diff)}: {unscored} row(s) now pass the checks and were never scored"
        else:
            plan.recheck.add(shard)
    return plan


def _refuse(plan: MeasurePlan, n_measured: int, work: Table) -> ConfigError:
    whys = Counter(plan.stale.values())
    lines = "; ".join(f"{n} shard(s): {why}" for why, n in whys.most_common(3))
    return ConfigError(
        f"{len(plan.stale)} of the {n_measured} shards already measured in {work.url} were measured with other "
        f"settings, which their stored measurements cannot decide ({lines}). Rerun with "
        "--set filter.changed_settings=remeasure to measure them again (the model work is repeated), rerun with "
        "the settings they were made with, or write to a new filter.output."
    )
