# `python -m paradiffusion` runs the composed CLI (pipelines/cli.py): the one place the core names the layer above it.
from pipelines.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
