"""Arrow schemas of the tables eval writes (the same contract as ``paradiffusion.schemas``)."""

from __future__ import annotations

import pyarrow as pa

#: One row per generated image (or per failed generation, with ``error`` set).
#: ``key`` = ``<model>/<prompt_set>/<prompt_id>/<seed>``; ``image_path`` is relative to the table folder.
EVAL_IMAGES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("image_path", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("settings", pa.string()),  # JSON: steps, guidance, size, dtype, negative prompt, model path
        pa.field("seconds", pa.float32()),
        pa.field("error", pa.string()),  # null when the image was made
    ]
)

#: One row per scored image: every metric that ran (null where it did not).
EVAL_METRICS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("clip_score", pa.float32()),  # 100 x mean cosine over the prompt's chunks
        pa.field("clip_score_truncated", pa.float32()),  # 100 x cosine with the prompt cut at the context length
        pa.field("clip_chunks", pa.int32()),
        pa.field("long_clip_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("imagereward", pa.float32()),
        pa.field("hpsv2", pa.float32()),
        pa.field("pickscore", pa.float32()),
        # DPG-Bench (prompt sets of kind dpg_bench): 100 x this image's share of yes answers after the
        # dependency rule, by the official script's arithmetic (null where it leaves the prompt out)
        # and the corrected one (eval/dpg.py); the prompt's score is the mean over its images.
        pa.field("dpg_score", pa.float32()),
        pa.field("dpg_score_corrected", pa.float32()),
        pa.field("error", pa.string()),
    ]
)

#: DPG-Bench: one row per judged image x question (``<metrics>/dpg_answers``). Written in
#: committed shards of whole images, so a rerun skips every image already judged.
DPG_ANSWERS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the eval_images key of the image
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),  # = the question file's item_id
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("crop", pa.int32(), nullable=False),  # 0-3: the image's place in the official 2x2 grid
        pa.field("qid", pa.int32(), nullable=False),  # proposition_id
        pa.field("question", pa.string()),  # as asked (question_template applied)
        pa.field("category", pa.string()),  # level 2, e.g. "attribute - color"
        pa.field("answer", pa.string()),  # the judge's raw answer
        pa.field("yes", pa.bool_(), nullable=False),  # first word "yes"
        pa.field("clear", pa.bool_(), nullable=False),  # first word "yes" or "no"
        pa.field("judge", pa.string()),  # model id (and revision) of the judge
        pa.field("created_at", pa.float64()),
    ]
)

#: The votes export: one row per vote.
VOTES = pa.schema(
    [
        pa.field("vote_id", pa.int64(), nullable=False),
        pa.field("voter", pa.string(), nullable=False),
        pa.field("voter_role", pa.string()),  # voter | admin (admins cannot vote; older databases may hold some)
        pa.field("voter_revoked", pa.bool_()),  # revoked after voting: left out of the report by default
        pa.field("pair_id", pa.int64(), nullable=False),
        pa.field("prompt_set", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("model_x", pa.string(), nullable=False),
        pa.field("model_y", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("choice", pa.string(), nullable=False),  # as the voter saw it: A, B or tie
        pa.field("a_model", pa.string(), nullable=False),  # which model was shown as A
        pa.field("b_model", pa.string(), nullable=False),
        pa.field("winner", pa.string()),  # model name, null for a tie
        pa.field("created_at", pa.float64()),
    ]
)
