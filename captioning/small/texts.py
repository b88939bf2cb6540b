"""Texts of the ``annotations`` table and their review states, as SQL shared by Python and DuckDB.

The table is append-only (see :mod:`captioning.small.annotations`): an *import* row carries a
text (``parent_version`` null); a *review* row decides on one text (``parent_version`` = that
text's version). :func:`texts_sql` turns the history into one row per text with its current
state (the latest decision on it, or its import state), and ``superseded`` (the same annotator
has a later version for the same key: an edit or a revert in Label Studio, or a ``withdrawn``
version with no text when the annotation was deleted there).

:func:`approved_sql` is the stage-3 rule (``annotations.train_rule``):

- ``latest``: one row per key, the approved text written last (the highest text version;
  versions follow the annotators' own times).
- ``each``: every annotator's approved text, one training row each (a key with two approved
  annotators gives two rows).

Only *current* texts count: a text its annotator has since edited, reverted or withdrawn
(deleted or skipped in Label Studio) is ``superseded`` and never trains, even when it was
approved; the new version trains once it is approved itself.

``annotations export-approved`` runs these on the Arrow history and ``make stats`` as views over
the Parquet shards, so the training table and the statistics cannot disagree.
"""

from __future__ import annotations

from typing import Literal

TrainRule = Literal["latest", "each"]
TRAIN_RULES: tuple[str, ...] = ("latest", "each")


def texts_sql(source: str) -> str:
    """One row per imported text of ``source`` (a table name or ``read_parquet(...)``) with its
    current ``state``, the deciding review (``reviewer``, ``review_comment``, ``reviewed_at``,
    ``decided_in``) and ``superseded``."""
    return f"""
WITH h AS (SELECT * FROM {source}),
t AS (SELECT * FROM h WHERE parent_version IS NULL),
d AS (
  SELECT key, parent_version, state, reviewer, review_comment, reviewed_at, version AS decided_in
  FROM h WHERE parent_version IS NOT NULL
  QUALIFY row_number() OVER (PARTITION BY key, parent_version ORDER BY version DESC) = 1
)
SELECT t.key, t.version, t.text, t.annotator, t.annotator_email, t.created_at, t.source_file, t.source_ref,
       t.content_hash, coalesce(d.state, t.state) AS state, d.reviewer, d.review_comment, d.reviewed_at,
       d.decided_in,
       t.version < max(t.version) OVER (PARTITION BY t.key, coalesce(t.annotator, '')) AS superseded
FROM t LEFT JOIN d ON d.key = t.key AND d.parent_version = t.version
""".strip()


def approved_sql(source: str, rule: str = "latest") -> str:
    """The approved texts that go into the stage-3 table, by ``rule`` (see the module docstring)."""
    if rule not in TRAIN_RULES:
        raise ValueError(f"train_rule must be one of {', '.join(TRAIN_RULES)}; got {rule!r}")
    part = "key" if rule == "latest" else "key, coalesce(annotator, '')"
    return (
        f"SELECT * FROM ({texts_sql(source)}) WHERE state = 'approved' AND NOT superseded "
        f"QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY version DESC) = 1"
    )
