"""`make vote` and `paradiffusion vote-admin ...`: serving, invites, pairs, progress, export."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.paths import images_url, votes_folder
from eval.schemas import EVAL_IMAGES
from eval.vote.db import VoteStore
from eval.vote.pairs import build_pairs, export_votes
from paradiffusion.config import ConfigError, RootConfig
from paradiffusion.stage import StageSummary, announce
from paradiffusion.storage import Table


def _local(url: str, what: str) -> Path:
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"{what} must be a local folder for the voting app, got {url}")
    return Path(url.removeprefix("file://"))


def open_store(cfg: RootConfig) -> VoteStore:
    folder = _local(votes_folder(cfg), "eval.vote.folder")
    return VoteStore(folder / "votes.sqlite", quota=cfg.eval.vote.pairs_per_voter)


def sync_pairs(cfg: RootConfig, store: VoteStore) -> StageSummary:
    """Add the pairs the current eval_images table allows (existing pairs are kept)."""
    summary = StageSummary("vote-pairs")
    images = Table(images_url(cfg), schema=EVAL_IMAGES)
    if not images.done_shards():
        raise ConfigError(f"no generated images in {images.url}: run `make eval-generate` first")
    v = cfg.eval.vote
    size = cfg.eval.study_size()
    built = build_pairs(images.read(), v.comparisons, v.prompt_sets, v.seeds_per_prompt, size, v.equalise)
    summary.n_in = len(built.rows) + sum(built.skipped.values())
    summary.n_out = store.add_pairs(built.rows)
    summary.rejected.update(built.skipped)
    if v.equalise == "crop":
        for what, n in built.aspect_mismatch.items():
            summary.flag(f"size_mismatch ({what}; centre-cropped)", n)
    if size is None and built.rows:  # no models configured: the size the pairs' images share
        size = (int(built.rows[0]["width_x"]), int(built.rows[0]["height_x"]))
    if size is not None:
        store.set_meta("display_size", f"{size[0]}x{size[1]}")
    summary.extra["pairs_total"] = store.n_pairs()
    store.set_meta("image_root", str(_local(images.url, "eval.generate.output").resolve()))
    Table(str(store.path.parent)).save_config(cfg, "vote", v)
    return summary.finish()


def display_size(cfg: RootConfig, store: VoteStore) -> tuple[int, int]:
    """The size every image is served at: ``eval.vote.size``, the study models' one size,
    or (no models configured) the size recorded when the pairs were built."""
    size = cfg.eval.study_size()
    if size is None:
        stored = store.get_meta("display_size")
        if stored is None:
            raise ConfigError("eval.vote.size is not set and no pairs were built yet: run `vote-admin pairs` first")
        size = tuple(int(x) for x in stored.split("x"))
    return size


def app_for(cfg: RootConfig, store: VoteStore):
    """The voting app over ``store`` with the ``eval.vote`` display and limits."""
    from eval.vote.app import create_app

    v = cfg.eval.vote
    return create_app(
        store,
        store.get_meta("image_root"),
        size=display_size(cfg, store),
        max_body_bytes=v.max_body_bytes,
        public_url=v.public_url,
    )


def run_vote(cfg: RootConfig, args: argparse.Namespace) -> int:
    from eval.vote.render_cache import prerender
    from eval.vote.server import serve_forever

    store = open_store(cfg)
    summary = sync_pairs(cfg, store)
    rendered = prerender(store, store.get_meta("image_root"), display_size(cfg, store))
    if rendered.get("withdrawn"):
        summary.flag("pairs withdrawn (an image cannot be shown; listed on the admin page)", rendered["withdrawn"])
    host = args.host or cfg.eval.vote.host
    port = args.port if args.port is not None else cfg.eval.vote.port
    announce(
        "vote",
        {
            "database": store.path,
            "pairs": f"{store.n_pairs()} ({summary.n_out} new)",
            "skipped": dict(summary.rejected) or "none",
            "images": f"served as one JPEG at {'x'.join(map(str, display_size(cfg, store)))}, no metadata "
            f"(equalise: {cfg.eval.vote.equalise}); rendered now: {rendered}"
            + (f"; WARNING: {dict(summary.flagged)}" if summary.flagged else ""),
            "voters": f"{sum(1 for v in store.progress()['voters'] if v['role'] == 'voter')} invited",
            "url": f"{(cfg.eval.vote.public_url or f'http://{host}:{port}').rstrip('/')}/vote?t=<token>   "
            "admin: /admin?t=<admin token>",
            "invite": "paradiffusion vote-admin invite NAME... [--admin]",
        },
    )
    serve_forever(app_for(cfg, store), host, port)
    return 0


def run_vote_admin(cfg: RootConfig, args: argparse.Namespace) -> int:
    store = open_store(cfg)
    v = cfg.eval.vote
    base = (args.base_url or v.public_url or f"http://{v.host}:{v.port}").rstrip("/")
    if args.action == "pairs":
        sync_pairs(cfg, store).print()
    elif args.action == "invite":
        if not args.names:
            raise ConfigError("vote-admin invite: give one or more voter names")
        role = "admin" if args.admin else "voter"
        page = "admin" if args.admin else "vote"
        print("# the tokens are shown once; only their hashes are stored", file=sys.stderr)
        for name in args.names:
            token = store.add_voter(name, role)
            print(f"{name}\t{role}\t{token}\t{base}/{page}?t={token}")
    elif args.action == "revoke":
        for name in args.names:
            print(f"{name}: {store.revoke(name)} token(s) revoked", file=sys.stderr)
    elif args.action == "progress":
        print(json.dumps(store.progress(), indent=2))
    elif args.action == "export":
        url, n = export_votes(store, str(store.path.parent))
        from paradiffusion.storage import Table

        # the committed shard list from the markers, never a glob (which would see a shard in flight)
        print(f"{n} votes -> {url} (DuckDB: SELECT * FROM {Table(url).sql_source()})", file=sys.stderr)
    return 0
