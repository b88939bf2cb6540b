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
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from captioning.small.demo import step_annotations, step_select_small, step_stats
from paradiffusion.cli import Command
from paradiffusion.log import get_logger, redact_argv
from pipelines.config import PipelinesConfig, load_config
from publish.demo import step_publish

log = get_logger("demo")

DEMO_OVERLAY = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass
class DemoContext:
    out: Path
    config_files: list[str]
    base_url: str = ""
    data: str = ""  # project.data_root: <out>/data, or s3://... with --s3
    overrides: list[str] = field(default_factory=list)  # --set lines every later step gets
    state: dict = field(default_factory=dict)  # what steps hand to later steps

    def cli(self, *argv: str, extra_sets: list[str] | None = None) -> None:
        """Run one stage through the real CLI; a non-zero exit stops the demo."""
        from pipelines.cli import main

        args = list(argv)
        for c in self.config_files:
            args += ["--config", c]
        for s in self.overrides + (extra_sets or []):
            args += ["--set", s]
        print(f"\n$ paradiffusion {' '.join(redact_argv(args))}", file=sys.stderr)
        rc = main(args)
        if rc != 0:
            raise SystemExit(f"demo step `paradiffusion {argv[0]}` failed with exit code {rc}")

    def config(self) -> PipelinesConfig:
        """The config the CLI steps run with (the demo's files and --set lines), for steps that call a stage directly."""
        return load_config(self.config_files, self.overrides)


def step_sample(ctx: DemoContext) -> None:
    """Build the sample images and URL list."""
    from paradiffusion.testing.sample import build_sample

    records = build_sample(ctx.out / "sample")
    ctx.state["records"] = records
    ctx.overrides.append(f"project.data_root={ctx.data}")
    log.info("sample: %d files in %s", len(records), ctx.out / "sample")


def step_download(ctx: DemoContext) -> None:
    """Download the sample from the local server with img2dataset, plus URLs that fail and rows that the
    safety checks refuse (each reason once; no unsafe content: the rows point at sample photos)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from paradiffusion.testing.sample import write_url_list

    records = ctx.state["records"]
    photo = next(r.name for r in records if r.kind == "photo")
    refused = {  # LAION-style metadata: these rows are answered without a request
        f"images/{photo}?demo=unsafe": ("A row whose metadata says punsafe 0.97.", 0.97, 0.0),
        f"images/{photo}?demo=watermark": ("A row whose metadata says pwatermark 0.91.", 0.0, 0.91),
        f"images/{photo}?demo=listed": ("A row whose URL is on the demo's URL denylist.", 0.0, 0.0),
        f"images/{photo}?demo=opted-out": ("A row whose URL is on the demo's opt-out list.", 0.0, 0.0),
    }
    url_list = write_url_list(
        records,
        ctx.base_url,
        ctx.out / "urls" / "sample.parquet",
        url_col="URL",
        caption_col="TEXT",
        extra_urls={
            "missing/deleted-photo.jpg": "A photo that is no longer on the server.",
            "html/not-an-image.jpg": "A link that answers with a web page.",
            "slow/30/images/chelsea.jpg": "A server too slow to answer within the timeout.",
            **{path: caption for path, (caption, _, _) in refused.items()},
        },
    )
    t = pq.read_table(url_list)
    meta = {f"{ctx.base_url}/{p}": (u, w) for p, (_, u, w) in refused.items()}
    punsafe = [meta.get(u, (0.01, 0.0))[0] for u in t["URL"].to_pylist()]
    pwatermark = [meta.get(u, (0.0, 0.02))[1] for u in t["URL"].to_pylist()]
    t = t.append_column("punsafe", pa.array(punsafe, pa.float32()))
    pq.write_table(t.append_column("pwatermark", pa.array(pwatermark, pa.float32())), url_list)

    # Lists as a user would name them in pipelines.yaml, made here from the sample: a SHA-256 list
    # holding the hash of one sample image (a stand-in for a published cleanup list), one URL, one opt-out.
    import hashlib

    lists = ctx.out / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    hashed = next(r.name for r in records if r.kind == "synthetic" and r.expect == "ok")
    digest = hashlib.sha256((ctx.out / "sample" / "images" / hashed).read_bytes()).hexdigest()
    (lists / "demo-sha256.csv").write_text(f"sha256\n{digest}\n")
    (lists / "demo-urls.txt").write_text(f"# the demo's URL denylist\n{ctx.base_url}/images/{photo}?demo=listed\n")
    (lists / "demo-optout.txt").write_text(f"{ctx.base_url}/images/{photo}?demo=opted-out\n")
    ctx.overrides += [  # the filter applies the same lists again
        f'download.denylists=[{{name: demo-sha256, path: "{lists / "demo-sha256.csv"}", kind: sha256}}, '
        f'{{name: demo-urls, path: "{lists / "demo-urls.txt"}", kind: url}}]',
        f'download.opt_outs=[{{name: demo-optout, path: "{lists / "demo-optout.txt"}", kind: url}}]',
    ]
    ctx.cli("download", extra_sets=[f"download.input={url_list}"])


def _demo_nsfw_head(tiny: dict, image: Path, out: Path, image_size: int) -> Path:
    """A tiny NSFW head (the detector's layers) that flags the one image whose tiny-CLIP embedding
    is ``image``'s (cosine > 0.99) and scores every other image 0.475: it shows the check firing."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from curation.decode import decode_image, resize_center_crop
    from curation.models import load_clip
    from curation.safety.nsfw import NSFWHead

    clip = load_clip(tiny["clip_model"], device="cpu")
    dec = decode_image(image.read_bytes())
    emb = clip.encode_images(resize_center_crop(dec.image, image_size)[None])[0]
    head = NSFWHead(int(emb.shape[0]))
    with torch.no_grad():
        for lin in (head.linear_1, head.linear_2, head.linear_3, head.linear_4):
            lin.weight.zero_()
            lin.bias.zero_()
        head.linear_1.weight[0] = torch.from_numpy(np.asarray(emb, np.float32))
        head.linear_1.bias[0] = -0.99
        head.linear_2.weight[0, 0] = head.linear_3.weight[0, 0] = 1.0
        head.linear_4.weight[0, 0], head.linear_4.bias[0] = 1000.0, -0.1
    save_file(head.state_dict(), out)
    return out


def step_filter(ctx: DemoContext) -> None:
    """Filter the downloaded shards with a tiny random CLIP + aesthetic head built here, and a tiny NSFW head."""
    from paradiffusion.testing.tiny_clip import build_tiny_clip

    tiny = build_tiny_clip(ctx.out / "models" / "tiny_clip")
    records = ctx.state["records"]
    flagged = [r.name for r in records if r.kind == "synthetic" and r.expect == "ok"][1]
    nsfw = _demo_nsfw_head(
        tiny, ctx.out / "sample" / "images" / flagged, ctx.out / "models" / "tiny_nsfw.safetensors", tiny["image_size"]
    )
    ctx.cli(
        "filter",
        extra_sets=[
            f"filter.models.clip_model={tiny['clip_model']}",
            f"filter.models.aesthetic={tiny['aesthetic']}",
            f"filter.models.nsfw={nsfw}",
        ],
    )


def step_caption(ctx: DemoContext) -> None:
    """Caption the kept set with a tiny random LLaVA, then with a tiny random native CogVLM (random words both)."""
    from paradiffusion.testing.tiny_cogvlm import build_tiny_cogvlm
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    model = build_tiny_vlm(ctx.out / "models" / "tiny_vlm")
    ctx.cli("caption", extra_sets=[f"caption.captioners.tiny.model={model}"])
    # the paper's captioner type (type: cogvlm), on the real CogVLM architecture at tiny size;
    # its captions sit beside the first captioner's in the same table
    cog = build_tiny_cogvlm(ctx.out / "models" / "tiny_cogvlm", "cogvlm")
    ctx.cli("caption", extra_sets=["caption.captioner=tiny_cogvlm", f"caption.captioners.tiny_cogvlm.model={cog}"])


def _eval_step(name: str) -> Callable[[DemoContext], None]:
    """A step of eval's demo (eval/demo_steps.py), imported when it runs."""

    def run(ctx: DemoContext) -> None:
        import eval.demo_steps

        getattr(eval.demo_steps, name)(ctx)

    run.__doc__ = f"eval.demo_steps.{name}"
    return run


def _training_step(name: str) -> Callable[[DemoContext], None]:
    """A step of training's demo (training/demo_steps.py), imported when it runs."""

    def run(ctx: DemoContext) -> None:
        import training.demo_steps

        getattr(training.demo_steps, name)(ctx)

    run.__doc__ = f"training.demo_steps.{name}"
    return run


#: (name, function) in pipeline order. A step gets the context and runs its stage.
STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("sample", step_sample),
    ("download", step_download),
    ("filter", step_filter),
    ("caption", step_caption),  # needs the kept set: runs after filter
    ("select-small", step_select_small),  # ParaImage-Small: candidates, annotation round trip, stats
    ("annotations", step_annotations),
    ("stats", step_stats),
    ("publish", step_publish),  # after stats: the card reads its cache
    ("train-stage1", _training_step("step_train_stage1")),  # tiny LLM + UNet + VAE on the kept images
    ("train-stage2", _training_step("step_train_stage2")),
    ("cache-text", _training_step("step_cache_text_stage3")),  # stage 3's text states, once: no LLM in stage 3
    ("train-stage3", _training_step("step_train_stage3")),
    ("generate", _training_step("step_generate")),
    ("eval-generate", _eval_step("step_eval_generate")),  # eval: tiny models, a few prompts
    ("eval", _eval_step("step_eval_metrics")),
    ("vote", _eval_step("step_eval_vote")),  # a SIMULATED vote: scripted voters through the real HTTP API
    ("eval-report", _eval_step("step_eval_report")),
]


def local_outputs_for_object_storage(out: Path) -> list[str]:
    """``--set`` lines for what stays on this machine when the data root is a URL: the training
    staging folder (the run folders themselves are on the URL, each committed checkpoint and the
    export copied there), the stats report and plots, eval's images (the voting app serves them),
    the voting database (SQLite), the HTML report and the generated PNGs."""
    return [
        f"train.staging_dir={out / 'train_staging'}",
        f"stats.output={out / 'stats'}",
        f"eval.generate.output={out / 'eval' / 'images'}",  # the voting app serves these PNGs from disk
        f"eval.vote.folder={out / 'eval' / 'votes'}",
        f"eval.report.output={out / 'eval' / 'report'}",
        f"generate.output={out / 'generated'}",
    ]


@contextlib.contextmanager
def _demo_bucket(args: argparse.Namespace) -> Iterator[str | None]:
    """The data root when it is not ``<out>/data``: ``--data-root URL`` as given (the storage
    settings come from the config or the AWS variables), or with ``--s3`` moto's S3 server on
    127.0.0.1 for the demo's run, its endpoint in this process's AWS variables (credentials too,
    unless they are set already: the server takes any), and ``s3://paradiffusion-demo/data``."""
    if args.data_root:
        yield args.data_root.rstrip("/")
        return
    if not args.s3:
        yield None
        return
    from paradiffusion.deps import require

    require("moto.server", "moto[server]", extra="dev")
    from paradiffusion.testing.s3 import S3Server

    with S3Server() as srv:
        saved = {k: os.environ.get(k) for k in srv.env()}
        given = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if os.environ.get("AWS_SECRET_ACCESS_KEY") else ()
        os.environ.update({k: v for k, v in srv.env().items() if k not in given})
        try:
            bucket = srv.make_bucket("paradiffusion-demo")
            log.info("--s3: moto's S3 server at %s (in memory: gone when the demo ends)", srv.endpoint_url)
            yield f"{bucket}/data"
            counts = srv.request_counts()
            log.info("--s3: the server answered %d requests (%s)", sum(counts.values()), dict(counts))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_demo(cfg: PipelinesConfig, args: argparse.Namespace) -> int:
    from paradiffusion.testing.http import serve_folder

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_files = list(args.config or ["pipelines.yaml"]) + [str(DEMO_OVERLAY)]
    ctx = DemoContext(out=out, config_files=config_files, overrides=list(args.overrides), data=str(out / "data"))
    t0 = time.time()
    only = set(args.only.split(",")) if args.only else None
    (out / "sample").mkdir(exist_ok=True)
    with _demo_bucket(args) as s3_root, serve_folder(str(out / "sample")) as base_url:
        if s3_root is not None:
            ctx.data = s3_root
            ctx.overrides = local_outputs_for_object_storage(out) + ctx.overrides
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
    p.add_argument(
        "--data-root",
        default=None,
        help="put the tables at this URL (e.g. s3://bucket/demo) instead of <out>/data; storage settings from "
        "the config's storage section or the AWS variables",
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="put the data root on S3: moto's S3 server on 127.0.0.1, started for the demo (needs moto[server])",
    )


DEMO = Command(
    help="run every stage on the bundled sample with tiny offline models", run=run_demo, add_arguments=_add_arguments
)
