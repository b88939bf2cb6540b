"""What every stage does the same way: announce, show progress, count, summarise.

A stage builds a :class:`StageSummary`, counts what goes in, what comes out and
what was rejected by reason, and at the end prints it and saves it as
``_summary.json`` beside its output. Nothing is dropped without a reason counted.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    it: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    file: TextIO | None = None,
    **kw,
) -> Iterator[T]:
    """A tqdm progress bar on stderr, or ``file`` (e.g. the terminal stream that
    :func:`paradiffusion.log.third_party_output_to` yields). When ``file`` is not a
    terminal (a pipe, a log) the bar is redrawn at most every 30 s, so the final state is
    written once, by ``close()``, not twice."""
    file = file or sys.stderr
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tqdm(
        it,
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        file=file,
        mininterval=0.2 if tty else 30.0,
        **kw,
    )


def announce(stage: str, lines: dict[str, Any]) -> None:
    """Say what the stage will do before it starts."""
    width = max((len(k) for k in lines), default=0)
    print(f"== {stage}", file=sys.stderr)
    for k, v in lines.items():
        print(f"   {k.ljust(width)} : {v}", file=sys.stderr)


@dataclass
class StageSummary:
    """Counts of one stage run: in, out, rejected by reason, time."""

    stage: str
    n_in: int = 0
    n_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)  # kept, but marked (e.g. caption quality flags)
    skipped_done: int = 0  # units (shards, keys) already finished by an earlier run
    skipped_unit: str = ""  # what skipped_done counts ("shards", "keys"), shown beside it
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    seconds: float | None = None

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n

    def flag(self, kind: str, n: int = 1) -> None:
        self.flagged[kind] += n

    def merge(self, other: StageSummary) -> None:
        self.n_in += other.n_in
        self.n_out += other.n_out
        self.rejected.update(other.rejected)
        self.flagged.update(other.flagged)
        self.skipped_done += other.skipped_done

    def finish(self) -> StageSummary:
        self.seconds = time.time() - self.started
        return self

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "in": self.n_in,
            "out": self.n_out,
            "rejected": dict(self.rejected.most_common()),
            "rejected_total": sum(self.rejected.values()),
            "flagged": dict(self.flagged.most_common()),
            "skipped_already_done": self.skipped_done,
            **({"skipped_unit": self.skipped_unit} if self.skipped_unit else {}),
            "seconds": round(self.seconds if self.seconds is not None else time.time() - self.started, 3),
            **self.extra,
        }

    def render(self) -> str:
        d = self.to_dict()
        rows = [("in", d["in"])]
        for reason, n in self.rejected.most_common():
            rows.append((f"  rejected: {reason}", n))
        rows.append(("out", d["out"]))
        for kind, n in self.flagged.most_common():
            rows.append((f"  flagged: {kind}", n))
        if self.skipped_done:
            unit = f" {self.skipped_unit}" if self.skipped_unit else ""
            rows.append((f"already done (skipped{unit})", self.skipped_done))
        for k, v in self.extra.items():
            if not isinstance(v, (dict, list)):
                rows.append((k, v))
        rows.append(("time", f"{d['seconds']:.1f} s"))
        width = max(len(str(r[0])) for r in rows)
        lines = [f"== {self.stage}: summary"] + [f"   {str(k).ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines)

    def print(self) -> None:
        print(self.render(), file=sys.stderr)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
