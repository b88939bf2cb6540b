"""The composition layer: the whole toolkit put together from the core and the stages.

Layers, lowest first (``tests/paradiffusion/test_layers.py`` enforces them):

- ``paradiffusion/``: the core. It imports no stage and nothing from here.
- ``curation/``, ``captioning/``, ``training/``, ``eval/``, ``stats/``: the stages. Each
  imports the core (and, where it reads another stage's output, that stage); none
  imports this package.
- ``pipelines/`` (this package): the composed ``pipelines.yaml`` model
  (:mod:`pipelines.config`), the command registry and ``main`` of the ``paradiffusion``
  command (:mod:`pipelines.cli`), ``make demo`` (:mod:`pipelines.demo`) and
  ``paradiffusion models fetch|check`` (:mod:`pipelines.hub_cli`), which walks every
  command's model declarations.

``python -m paradiffusion`` still works: ``paradiffusion/__main__.py`` calls
:func:`pipelines.cli.main`, the one place the core names this layer.
"""
