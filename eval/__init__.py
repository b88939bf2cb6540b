"""Evaluation: prompt sets, image generation, automatic metrics, human voting, report.

::

    prompts.py      ViLG-300, ParaPrompts-400 and DPG-Bench, each prompt with its category
    models.py       one interface for every text-to-image model (registry by `kind`)
    generate.py     `make eval-generate`: seeded images per prompt, an `eval_images` table
    metrics.py      `make eval`: CLIP score (long prompts chunked), aesthetic, FID (streamed), preference models
    dpg.py          DPG-Bench arithmetic (official and corrected); dpg_judge.py: its VQA-judge step in `make eval`
    stats.py        bootstrap confidence intervals over prompts, voting rates
    vote/           `make vote`: the blind pairwise voting web app and its SQLite store
    report.py       `make eval-report`: one HTML page with voting rates, metrics and image grids

The top-level package is named ``eval``; it shadows the builtin only inside modules
that import it.
"""
