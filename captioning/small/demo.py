"""The demo steps of ParaImage-Small and stats (registered in ``pipelines/demo.py``).

The annotation step imports a *simulated* Label Studio export (see
:mod:`captioning.small.simulate`): no person wrote those descriptions.
"""

from __future__ import annotations

import json

from paradiffusion.log import get_logger

log = get_logger("demo")


def step_select_small(ctx) -> None:
    """Choose candidates; k-means diversity when the filter saved CLIP embeddings."""
    import pyarrow.compute as pc

    from paradiffusion.schemas import SCORES
    from paradiffusion.storage import Table, join

    scores = Table(join(ctx.data, "scores"), SCORES).read(columns=["kept", "image_embedding"])
    kept = scores.filter(pc.field("kept")) if scores.num_rows else scores
    extra = []
    if kept.num_rows == 0 or kept["image_embedding"].null_count == kept.num_rows:
        log.info(
            "select-small: the scores have no CLIP embeddings (filter.save_embeddings is off): selecting by score only"
        )
        extra.append("select_small.diversity=none")
    ctx.cli("select-small", extra_sets=extra)


def step_annotations(ctx) -> None:
    """Export tasks, import a SIMULATED two-annotator Label Studio export (twice: the second
    import adds nothing), review a few, show the status and export the approved set."""
    import fsspec

    from captioning.small.simulate import simulated_export
    from paradiffusion.storage import join

    ctx.cli("annotations", "export")
    with fsspec.open(join(ctx.data, "annotation_tasks", "tasks.json"), "r") as f:  # the data root may be a URL
        tasks = json.load(f)
    sim = ctx.out / "annotations" / "simulated_label_studio_export.json"
    sim.parent.mkdir(parents=True, exist_ok=True)
    sim.write_text(json.dumps(simulated_export(tasks), indent=1))
    log.info("SIMULATED annotations (two made-up annotators, texts padded from the VLM drafts): %s", sim)
    ctx.cli("annotations", "import", str(sim))
    ctx.cli("annotations", "import", str(sim))  # idempotent: everything is already imported
    from captioning.small.annotations import AnnotationStore

    keys = [t["data"]["key"] for t in tasks]
    # a rerun of the demo finds these already decided: only keys still submitted are reviewed
    texts = AnnotationStore(join(ctx.data, "annotations")).texts()
    pending = {t["key"] for t in texts if t["state"] == "submitted" and not t["superseded"]}
    lines = ["key,decision,reviewer,comment"]
    for i in (0, 4, 5):  # see simulate.py: 1 cancelled, 2 empty, 3 vague
        if i < len(keys) and keys[i] in pending:
            lines.append(f"{keys[i]},approve,demo-reviewer,follows the guidelines")
    if len(keys) > 3 and keys[3] in pending:
        lines.append(f"{keys[3]},reject,demo-reviewer,too short and vague: describe objects and layout")
    decisions = ctx.out / "annotations" / "review_decisions.csv"
    decisions.write_text("\n".join(lines) + "\n")
    if len(lines) > 1:
        ctx.cli("annotations", "review", "--file", str(decisions))
    ctx.cli("annotations", "status")
    ctx.cli("annotations", "export-approved")


def step_stats(ctx) -> None:
    """DuckDB views over every table, canned queries, report with plots."""
    ctx.cli("stats")
