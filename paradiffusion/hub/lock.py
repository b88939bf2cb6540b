"""``models.lock``: the commit each Hugging Face model of the config is held at.

``paradiffusion models fetch`` writes it (a YAML file meant to be checked in beside
``pipelines.yaml``; ``models.lock`` in the config says where): for every Hub model, the
branch or tag the config names and the commit it resolved to. From then on every run,
on any node, loads exactly those commits:

- before a command starts, each Hub model with a movable revision (``main``, a tag) gets
  its locked commit (:func:`pin`); the cache must hold that commit *and* its
  ``refs/<revision>`` must point at it, because the libraries' loaders read that ref in
  offline mode. A cache whose ref names another commit is refused with one line naming
  both (:class:`~paradiffusion.hub.refs.ModelUnavailable`); ``models fetch`` puts the locked
  commit back, ``models fetch --update`` moves the lock to the newest;
- the commits the run loads are exported (``PARADIFFUSION_MODEL_COMMITS``, inherited by
  Ray workers and DeepSpeed ranks) so loaders pass the commit itself as the revision and
  writers record it (:func:`resolved_commit`), and ``_config.yaml`` lists them
  (:func:`run_models`).

A revision that is already a full commit SHA needs no entry: it cannot move.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from paradiffusion.hub.refs import _SHA, ModelRef, ModelUnavailable

DEFAULT_REVISION = "main"  # what huggingface_hub resolves when no revision is given
VERSION = 1
ENV = "PARADIFFUSION_MODEL_COMMITS"

_HEADER = """\
# models.lock: the commit each Hugging Face model of the config resolved to.
# Written by `paradiffusion models fetch`; check it in. Every run loads exactly these commits and
# refuses a model cache whose commit differs. `paradiffusion models fetch --update` moves every
# entry to the newest commit of its branch (then commit the changed file).
"""


class LockError(ModelUnavailable):
    """models.lock cannot be read; the message is one line naming the file."""


def lock_key(repo: str, revision: str | None) -> str:
    """``owner/name@revision`` (``main`` when the config names none)."""
    return f"{repo}@{revision or DEFAULT_REVISION}"


def movable(ref: ModelRef) -> bool:
    """A Hub model whose revision is a branch or tag (not a full commit SHA): what the lock holds."""
    return ref.kind == "hf" and not _SHA.match(ref.revision or "")


@dataclass
class ModelsLock:
    """The lock file's entries: ``owner/name@revision`` -> {commit, settings}."""

    path: Path | None
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path | None) -> ModelsLock:
        """The lock at ``path`` (None: no lock configured; a missing file: an empty lock)."""
        if path is None:
            return cls(None)
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            return cls(p)
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LockError(f"models.lock = {p}: cannot be read ({type(exc).__name__}: {exc})") from None
        models = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(models, dict) or doc.get("version") != VERSION:
            raise LockError(
                f"models.lock = {p}: not a version {VERSION} lock (expected 'version: {VERSION}' and a 'models:' "
                "mapping). Fix: delete it and run `paradiffusion models fetch` to write it again"
            )
        for key, entry in models.items():
            commit = entry.get("commit") if isinstance(entry, dict) else None
            if "@" not in str(key) or not isinstance(commit, str) or not _SHA.match(commit):
                raise LockError(
                    f"models.lock = {p}: entry {key!r} needs 'owner/name@revision' with a 40-hex 'commit' "
                    f"(got {entry!r}). Fix: correct it, or delete the entry and run `paradiffusion models fetch`"
                )
        return cls(p, {str(k): dict(v) for k, v in models.items()})

    def commit_for(self, repo: str, revision: str | None) -> str | None:
        entry = self.entries.get(lock_key(repo, revision))
        return entry["commit"] if entry else None

    def set(self, repo: str, revision: str | None, commit: str, settings: list[str]) -> None:
        self.entries[lock_key(repo, revision)] = {"commit": commit, "settings": sorted(settings)}

    def write(self) -> None:
        """Write the file atomically (a temporary file renamed over it), entries sorted: a stable diff."""
        if self.path is None:
            return
        doc = {"version": VERSION, "models": {k: self.entries[k] for k in sorted(self.entries)}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(_HEADER + yaml.safe_dump(doc, sort_keys=False, width=200))
        os.replace(tmp, self.path)


def pin(refs: list[ModelRef], lock: ModelsLock) -> tuple[list[ModelRef], list[ModelRef]]:
    """``refs`` with the locked commit set on every locked Hub model; and the movable ones the lock lacks."""
    out, unlocked = [], []
    for r in refs:
        commit = lock.commit_for(r.source, r.revision) if movable(r) else None
        if commit:
            r = dataclasses.replace(r, commit=commit)
        elif movable(r) and lock.path is not None:
            unlocked.append(r)
        out.append(r)
    return out, unlocked


# --------------------------------------------------------------------------- what this run loads
def export_commits(records: list[dict]) -> dict[str, str]:
    """The variable that tells this process and its children which commit each Hub model resolved to."""
    return {ENV: json.dumps(records, sort_keys=True)}


def run_models() -> list[dict]:
    """[{model, revision, commit, settings}] of the Hub models this run resolved (for ``_config.yaml``)."""
    raw = os.environ.get(ENV)
    if not raw:
        return []
    try:
        got = json.loads(raw)
    except ValueError:
        return []
    return got if isinstance(got, list) else []


def resolved_commit(repo: str, revision: str | None) -> str | None:
    """The commit ``repo`` at ``revision`` resolved to before this run started (None: not a resolved Hub model).

    A full SHA revision is its own commit. Works in Ray workers and DeepSpeed ranks too (the
    driver's resolution is inherited through the environment).
    """
    if revision and _SHA.match(revision):
        return revision
    want = revision or DEFAULT_REVISION
    for m in run_models():
        if m.get("model") == repo and (m.get("revision") or DEFAULT_REVISION) == want:
            return m.get("commit")
    return None
