"""Commands of the eval stage (light: heavy imports happen inside the run functions)."""

from __future__ import annotations

import argparse
import os

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig


def _generate(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.generate import run_generate

    return run_generate(cfg, args)


def _generate_args(p: argparse.ArgumentParser) -> None:
    from eval.generate import _add_arguments

    _add_arguments(p)


def _metrics(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.metrics import run_metrics

    return run_metrics(cfg, args)


def _vote(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.vote.admin import run_vote

    return run_vote(cfg, args)


def _vote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="override eval.vote.host")
    p.add_argument("--port", type=int, default=None, help="override eval.vote.port")


def _vote_admin(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.vote.admin import run_vote_admin

    return run_vote_admin(cfg, args)


def _vote_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["pairs", "invite", "revoke", "progress", "export"],
        help="pairs: (re)build the pairs from eval_images; invite NAME...: new invite tokens; "
        "revoke NAME...; progress: per voter and comparison; export: votes to Parquet",
    )
    p.add_argument("names", nargs="*", help="voter names (invite, revoke)")
    p.add_argument("--admin", action="store_true", help="invite: make admin tokens (the /admin page)")
    p.add_argument("--base-url", default=None, help="invite: print links with this base URL")


def _report(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.report import run_report

    return run_report(cfg, args)


# --------------------------------------------------------------------------- models each command loads
def _generate_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    """Every model eval-generate runs: kind paradiffusion (export or release), kind diffusers (a pipeline)."""
    from paradiffusion.hub import ModelRef, looks_local
    from training.cli import paradiffusion_models

    ec = cfg.eval
    refs: list = []
    for name in ec.generate.models or list(ec.models):
        m = ec.models[name]
        key = f"eval.models.{name}"
        if m.kind == "paradiffusion":
            refs += paradiffusion_models(f"{key}.path", m.path, m.llm, m.vae, f"{key}.llm", f"{key}.vae")
        else:
            kind = "folder" if looks_local(m.path) else "hf"
            refs.append(ModelRef(f"{key}.path", m.path, kind, layout=("pipeline",), note="diffusers pipeline"))
    return refs


def _metrics_models(cfg: RootConfig, args: argparse.Namespace | None) -> list:
    """CLIP (and Long-CLIP), the aesthetic head, Inception weights for FID, the DPG-Bench judge, the preference models."""
    from paradiffusion.hub import model_ref, open_clip_refs, unmanaged, weights_ref

    mc = cfg.eval.metrics
    refs = open_clip_refs("eval.metrics.clip_model", mc.clip_model, mc.clip_pretrained, "eval.metrics.clip_pretrained")
    if mc.long_clip_model:
        refs += open_clip_refs("eval.metrics.long_clip_model", mc.long_clip_model)
    if mc.aesthetic:
        refs.append(weights_ref("eval.metrics.aesthetic", mc.aesthetic, note="LAION aesthetic predictor"))
    if mc.fid_reference and mc.fid_features == "inception" and mc.fid_inception_weights:
        refs.append(weights_ref("eval.metrics.fid_inception_weights", mc.fid_inception_weights))
    pc = mc.preference
    for setting, value, package in (
        ("imagereward", pc.imagereward, "image-reward"),
        ("hpsv2", pc.hpsv2, "hpsv2"),
    ):
        if value:
            key = f"eval.metrics.preference.{setting}"
            local = os.path.exists(os.path.expanduser(value))
            refs.append(
                weights_ref(key, value) if local else unmanaged(key, value, f"the {package} package fetches it")
            )
    dc = mc.dpg
    if dc.questions and dc.judge:  # DPG-Bench's VQA judge: an entry of caption.captioners
        from captioning.cli import captioner_models

        spec = cfg.caption.captioners.get(dc.judge)
        if spec is not None:  # an unknown name is reported by the stage with the names it knows
            refs += captioner_models(f"caption.captioners.{dc.judge}", spec)
    if pc.pickscore:
        refs.append(model_ref("eval.metrics.preference.pickscore", pc.pickscore, layout=("transformers",)))
        refs.append(
            model_ref(
                "eval.metrics.preference.pickscore_processor",
                pc.pickscore_processor or pc.pickscore,
                layout=("processor", "tokenizer"),
            )
        )
    return refs


EVAL_GENERATE = Command(
    help="generate seeded images for the eval prompt sets from every configured model",
    run=_generate,
    add_arguments=_generate_args,
    models=_generate_models,
)
EVAL_METRICS = Command(
    help="automatic metrics (CLIP score, aesthetic, FID, preference models) with bootstrap CIs",
    run=_metrics,
    models=_metrics_models,
)
VOTE = Command(help="serve the blind pairwise voting app (builds the pairs first)", run=_vote, add_arguments=_vote_args)
VOTE_ADMIN = Command(
    help="voting admin: invite tokens, pairs, progress, export votes to Parquet",
    run=_vote_admin,
    add_arguments=_vote_admin_args,
)
EVAL_REPORT = Command(help="HTML report: voting rates with 95%% CIs, metrics, image grids", run=_report)
