"""Curation: download web image-text pairs (img2dataset) and filter them (Ray Data)."""

# paradiffusion.config composes this package's config sections, and they import its
# StrictModel: loading the core first makes `import curation.config` work on its own.
import paradiffusion.config  # noqa: F401, E402
