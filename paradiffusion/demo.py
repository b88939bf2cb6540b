"""`make demo`: every stage that exists, on the bundled sample, with tiny offline models.

The demo goes through the same CLI a user types (``paradiffusion <stage> --config
pipelines.yaml --config configs/demo.yaml --set ...``), so what it shows working is
the real path. It first makes what a laptop lacks: the sample images served on a
local HTTP server, and tiny random models saved as local folders (a tiny model is
a real model with few weights; its outputs mean nothing, the plumbing is real).

Each stage adds one step to :data:`STEPS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from paradiffusion.cli import Command
from paradiffusion.config import PipelinesConfig
from paradiffusion.log import get_logger

log = get_logger("demo")

DEMO_OVERLAY = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass
class DemoContext:
    out: Path
    config_files: list[str]
    base_url: str = ""
    overrides: list[str] = field(default_factory=list)  # --set lines every later step gets
    state: dict = field(default_factory=dict)  # what steps hand to later steps

    def cli(self, *argv: str, extra_sets: list[str] | None = None) -> None:
        """Run one stage through the real CLI; a non-zero exit stops the demo."""
        from paradiffusion.cli import main

        args = list(argv)
        for c in self.config_files:
            args += ["--config", c]
        for s in self.overrides + (extra_sets or []):
            args += ["--set", s]
        print(f"\n$ paradiffusion {' '.join(args)}", file=sys.stderr)
        rc = main(args)
        if rc != 0:
            raise SystemExit(f"demo step `paradiffusion {argv[0]}` failed with exit code {rc}")


def step_sample(ctx: DemoContext) -> None:
    """Build the sample images and URL list."""
    from paradiffusion.testing.sample import build_sample

    records = build_sample(ctx.out / "sample")
    ctx.state["records"] = records
    ctx.overrides.append(f"project.data_root={ctx.out / 'data'}")
    log.info("sample: %d files in %s", len(records), ctx.out / "sample")


#: (name, function) in pipeline order. A step gets the context and runs its stage.
STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("sample", step_sample),
]


def run_demo(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from paradiffusion.testing.http import serve_folder

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_files = list(args.config or ["pipelines.yaml"]) + [str(DEMO_OVERLAY)]
    ctx = DemoContext(out=out, config_files=config_files, overrides=list(args.overrides))
    t0 = time.time()
    only = set(args.only.split(",")) if args.only else None
    (out / "sample").mkdir(exist_ok=True)
    with serve_folder(str(out / "sample")) as base_url:
        ctx.base_url = base_url
        for name, fn in STEPS:
            if only and name not in only and name != "sample":
                continue
            print(f"\n######## demo: {name}", file=sys.stderr)
            fn(ctx)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs under {out}", file=sys.stderr)
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")


DEMO = Command(help="run every stage on the bundled sample with tiny offline models", run=run_demo,
               add_arguments=_add_arguments)
