"""Shared core of the ParaDiffusion toolkit.

Everything the stages agree on lives here: the config machinery and its core sections
(`config`), the storage contract between stages (`storage`, `schemas`), the stage
summary and progress conventions (`stage`), Ray start-up (`raycluster`), the models a
stage names resolved before it starts (`hub`) and the CLI machinery (`cli`: `Command`).
Stage code lives in the top-level folders `curation/`, `captioning/`, `training/`,
`eval/` and `stats/`; the composed config, the command registry, the demo and
`paradiffusion models` live one layer up, in `pipelines/`. The core imports no stage
(tests/paradiffusion/test_layers.py checks it); `__main__.py` is the one exception,
so that `python -m paradiffusion` runs `pipelines.cli.main`.
"""

__version__ = "0.1.0"

from paradiffusion import offline as _offline

# no library of ours calls home on import or start-up (inherited by every process we start)
_offline.apply()
