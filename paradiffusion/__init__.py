"""Shared core of the ParaDiffusion toolkit.

Everything the stages agree on lives here: the config file and its validation
(`config`), the storage contract between stages (`storage`, `schemas`), the stage
summary and progress conventions (`stage`), Ray start-up (`raycluster`), the models a
stage names resolved before it starts (`hub`) and the CLI (`cli`). Stage code lives in the top-level folders `curation/`, `captioning/`,
`training/` and `eval/`.
"""

__version__ = "0.1.0"
