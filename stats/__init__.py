"""DuckDB statistics over every Parquet table, read in place: ``views.sql``, canned queries
(Table 1, caption-length histogram, filter funnel, quality flags, captioner comparison,
annotation progress) and a Markdown report with PNG plots.
"""
