"""A *simulated* Label Studio export, for the demo and the tests: no person wrote these texts.

:func:`simulated_export` takes the tasks that ``annotations export`` wrote and returns what
Label Studio's JSON export would look like after two annotators worked on them: task ``id``s,
``annotations`` with ``id``, ``result[].value.text``, ``completed_by`` (one annotator as a user
dict, one as a bare user id, as Label Studio writes either), ``created_at``/``updated_at``,
``was_cancelled``, ``lead_time``, plus the edge cases an importer must handle: a cancelled
(skipped) task, an empty submission, a description that was later updated, a vague one.

The "descriptions" are the VLM draft padded with fixed sentences, so their word counts
land in the guideline range; they say nothing true about the images.
"""

from __future__ import annotations

import datetime as _dt

ANNOTATORS = ({"id": 11, "email": "annotator.one@example.com", "first_name": "", "last_name": ""}, 12)

_FILLER = (
    "The main subject sits near the centre of the frame and takes up about a third of the picture. "
    "On the left side there is a softer, out-of-focus area, while the right side shows more detail "
    "and texture. The colours are natural and balanced, with warm highlights and cool shadows. "
    "The background is plain enough that the subject stands out, and the light falls evenly from "
    "the upper left, leaving a gentle shadow under the main object. The overall composition is calm "
    "and orderly, with a clear foreground, middle ground and background."
)


def _text(draft: str, i: int) -> str:
    draft_words = (draft or "").split()[:20]
    return " ".join(f"[simulated description {i}] {_FILLER}".split() + draft_words)


def _ts(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def simulated_export(tasks: list[dict], start: _dt.datetime | None = None) -> list[dict]:
    """A Label Studio-style JSON export of ``tasks`` (as written by ``annotations export``)."""
    start = start or _dt.datetime(2026, 1, 5, 9, 0, tzinfo=_dt.timezone.utc)
    out = []
    ann_id = 100
    for i, task in enumerate(tasks):
        who = ANNOTATORS[i % 2]
        created = start + _dt.timedelta(minutes=7 * i)
        ann_id += 1
        ann = {
            "id": ann_id,
            "completed_by": who,
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": _ts(created),
            "updated_at": _ts(created),
            "lead_time": 240.5 + i,
            "result_count": 0,
            "task": i + 1,
            "project": 1,
            "parent_prediction": None,
            "parent_annotation": None,
            "result": [
                {
                    "id": f"r{i}",
                    "from_name": "caption",
                    "to_name": "image",
                    "type": "textarea",
                    "origin": "manual",
                    "value": {"text": [_text(task["data"].get("draft", ""), i)]},
                }
            ],
        }
        if i == 1:  # the annotator skipped this task
            ann.update(was_cancelled=True, result=[])
        elif i == 2:  # submitted with nothing typed
            ann["result"][0]["value"]["text"] = ["   "]
        elif i == 3:  # a vague, too short description: fails the guideline checks
            ann["result"][0]["value"]["text"] = ["A nice picture of something."]
        elif i == 4:  # written, then updated later by the same annotator
            ann["updated_at"] = _ts(created + _dt.timedelta(hours=2))
            ann["result"][0]["value"]["text"] = [_text(task["data"].get("draft", ""), i) + " (updated)"]
        out.append(
            {
                "id": i + 1,
                "data": task["data"],
                "annotations": [ann],
                "predictions": task.get("predictions", []),
                "drafts": [],
                "meta": {},
                "created_at": _ts(start),
                "updated_at": ann["updated_at"],
                "inner_id": i + 1,
                "total_annotations": 1,
                "cancelled_annotations": int(i == 1),
                "total_predictions": len(task.get("predictions", [])),
                "project": 1,
            }
        )
    return out
