"""Commands of ParaImage-Small: ``select-small`` and ``annotations <action>``.

Light imports only: the work is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys

from paradiffusion.cli import Command
from paradiffusion.config import RootConfig

ANNOTATION_ACTIONS = (
    "export",
    "push",
    "pull",
    "import",
    "review",
    "status",
    "history",
    "export-approved",
    "serve",
)


def _select(cfg: RootConfig, args: argparse.Namespace) -> int:
    from captioning.small.select import run_select_small

    run_select_small(cfg)
    return 0


SELECT_SMALL = Command(
    help="choose ParaImage-Small candidates by aesthetic score, resolution and CLIP-cluster diversity",
    run=_select,
)


def _annotations(cfg: RootConfig, args: argparse.Namespace) -> int:
    from captioning.small import annotations as an
    from captioning.small.lsclient import LabelStudioError
    from captioning.small.lsserver import ServerError

    try:
        if args.action == "export":
            an.export_tasks(cfg)
        elif args.action in ("push", "pull", "serve"):
            from captioning.small import sync

            if args.action == "push":
                sync.push(cfg)
            elif args.action == "pull":
                sync.pull(cfg, args.export_type)
            else:
                return sync.serve(cfg, install_only=args.install_only)
        elif args.action == "import":
            if not args.file:
                print(
                    "error: annotations import needs a FILE (Label Studio .json export, .csv or .jsonl)",
                    file=sys.stderr,
                )
                return 2
            for f in args.file:
                an.import_file(cfg, f)
        elif args.action == "review":
            return _review(cfg, args)
        elif args.action == "status":
            st = an.status(cfg)
            print(an.render_status(st))
        elif args.action == "history":
            return _history(cfg, args)
        elif args.action == "export-approved":
            an.export_approved(cfg)
    except (an.ImportRefused, an.ReviewError, LabelStudioError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _history(cfg: RootConfig, args: argparse.Namespace) -> int:
    from captioning.small import annotations as an

    if not args.key:
        print("error: annotations history needs --key", file=sys.stderr)
        return 2
    store = an.AnnotationStore(an.annotations_url(cfg))
    rows = store.history(args.key).to_pylist()
    if not rows:
        print(f"error: key {args.key!r} has no annotation", file=sys.stderr)
        return 1
    for r in rows:
        if r["parent_version"] is None:
            if r["state"] == "withdrawn":
                print(f"v{r['version']} withdrawn no text of {an.who(r)} any more: {r['source_ref']}")
                continue
            print(f"v{r['version']} {r['state']:<9} text by {an.who(r)} ({r['source_file']} {r['source_ref']})")
            print(f"    {r['text']}")
        else:
            comment = f": {r['review_comment']}" if r["review_comment"] else ""
            print(f"v{r['version']} {r['state']:<9} decides v{r['parent_version']}, by {r['reviewer']}{comment}")
    print("texts now:")
    for t in store.texts(store.history(args.key)):
        if t["state"] == "withdrawn" and not t["superseded"]:
            print(f"    v{t['version']} by {an.who(t)}: withdrawn (no text in Label Studio)")
            continue
        mark = f"superseded by a later version of {an.who(t)}" if t["superseded"] else t["state"]
        check = an.check_text(t["text"] or "", cfg.annotations).render()
        print(f"    v{t['version']} by {an.who(t)}: {mark}; guideline checks: {check}")
    return 0


def _review(cfg: RootConfig, args: argparse.Namespace) -> int:
    from captioning.small import annotations as an

    if args.decisions:
        decisions, bad = an.read_decisions(args.decisions, args.reviewer)
        for b in bad:
            print(f"error: {b}", file=sys.stderr)
    else:
        chosen = [a for a in ("approve", "reject", "submit") if getattr(args, a)]
        if not args.key or len(chosen) != 1:
            print(
                "error: annotations review needs --key K and one of --approve/--reject/--submit "
                "(or --file DECISIONS.csv)",
                file=sys.stderr,
            )
            return 2
        decisions = [an.Decision(args.key, chosen[0], args.reviewer or "", args.comment or "", args.version)]
        bad = []
    _, refused = an.review(cfg, decisions, force=args.force)
    return 1 if refused or bad else 0


def _annotation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ANNOTATION_ACTIONS, help="what to do")
    p.add_argument("file", nargs="*", help="import: Label Studio JSON export(s), .csv or .jsonl (key,text,annotator)")
    p.add_argument("--key", help="review/history: the image key")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--approve", action="store_true", help="review: approve a text")
    g.add_argument("--reject", action="store_true", help="review: reject it (needs --comment)")
    g.add_argument("--submit", action="store_true", help="review: move a draft to submitted")
    p.add_argument("--reviewer", help="review: who decides")
    p.add_argument("--comment", help="review: why (required to reject)")
    p.add_argument(
        "--version", type=int, help="review: the text version decided on (needed when a key has several open texts)"
    )
    p.add_argument(
        "--file",
        dest="decisions",
        metavar="DECISIONS",
        help="review: a batch of decisions, CSV/JSONL with key,decision,reviewer,comment[,version]",
    )
    p.add_argument("--force", action="store_true", help="review: approve even when the guideline checks fail")
    p.add_argument(
        "--export-type", choices=("JSON", "JSON_MIN"), help="pull: export format (default annotations.label_studio)"
    )
    p.add_argument("--install-only", action="store_true", help="serve: install Label Studio into its venv and exit")


ANNOTATIONS = Command(
    help="Label Studio round trip and review: serve | export | push | pull | import FILE | review | status | "
    "history | export-approved",
    run=_annotations,
    add_arguments=_annotation_args,
)
