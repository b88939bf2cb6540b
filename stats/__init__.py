"""DuckDB statistics over every Parquet table, read in place: ``views.sql``, canned queries
(Table 1, caption-length histogram, filter funnel, quality flags, captioner comparison,
annotation progress) and a Markdown report with PNG plots.
"""

# paradiffusion.config composes this package's config sections, and they import its
# StrictModel: loading the core first makes importing a submodule work on its own.
import paradiffusion.config  # noqa: F401, E402
