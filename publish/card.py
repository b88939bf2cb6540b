"""The dataset card (README.md with the Hub's YAML metadata) and ``croissant.json``, from the data.

Both are built from one :class:`Facts` object (counts, files, columns, provenance), so the card
and the Croissant metadata cannot disagree. The YAML front matter is written by
``huggingface_hub.DatasetCardData`` (the Hub's own metadata model); Croissant is JSON-LD
written here as a plain dict (``mlcroissant`` reads and validates it; it has no writer API
for a dataset built outside it).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from paradiffusion.log import get_logger

log = get_logger("publish")

TITLES = {
    "big": "ParaImage-Big: web images with VLM-written paragraph captions",
    "small": "ParaImage-Small: high-quality images with approved hand-written paragraph descriptions",
}

CITATIONS = """```bibtex
@article{wu2023paragraph,
  title   = {Paragraph-to-Image Generation with Information-Enriched Diffusion Model},
  author  = {Wu, Weijia and Li, Zhuang and He, Yefei and Shou, Mike Zheng and Shen, Chunhua and
             Cheng, Lele and Li, Yan and Gao, Tingting and Zhang, Di and Wang, Zhongyuan},
  journal = {arXiv preprint arXiv:2311.14284},
  year    = {2023}
}
@inproceedings{schuhmann2022laion,
  title     = {{LAION-5B}: An open large-scale dataset for training next generation image-text models},
  author    = {Schuhmann, Christoph and others},
  booktitle = {NeurIPS Datasets and Benchmarks Track},
  year      = {2022}
}
@misc{beaumont2021img2dataset,
  author = {Romain Beaumont},
  title  = {img2dataset: Easily turn large sets of image urls to an image dataset},
  year   = {2021},
  howpublished = {\\url{https://github.com/rom1504/img2dataset}}
}
```"""

LIMITATIONS = [
    "Captions are written by vision-language models and can describe things that are not in the image "
    "(hallucinations); the `caption_flags` and each caption's `flags` mark the quality checks that fired, "
    "they do not prove a caption right.",
    "Without `include_images`, rows point at URLs: images disappear or change over time (link rot), so a "
    "download today gets fewer and possibly different images.",
    "The alt texts are the web's, unedited; they can hold personal names or offensive text.",
    "The filters are automatic thresholds: some unsafe, watermarked or low-quality images pass them and "
    "some good ones are removed.",
]


@dataclass
class SubsetFacts:
    name: str
    rows: int
    files: list[dict]  # {"path", "rows", "bytes", "sha256"}
    schema: pa.Schema | None
    wds_files: list[dict] = field(default_factory=list)


@dataclass
class Facts:
    pretty_name: str
    license: str
    license_note: str
    language: list[str]
    version: str
    written_at: str
    toolkit_version: str
    config_fingerprint: str
    subsets: dict[str, SubsetFacts]
    counts: dict[str, Any]  # kept, not_kept, no_caption, rejected by reason, images skipped ...
    caption_sets: list[dict]  # model, revision, prompt id, hash, rows, first, last
    prompts: dict[str, str]
    thresholds: dict[str, Any]
    stats_markdown: str = ""
    assets: list[str] = field(default_factory=list)
    url: str = ""


def size_category(n: int) -> str:
    """The Hub's size_categories value for ``n`` rows."""
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    for b, label in bounds:
        if n < b:
            return label
    return "1B<n<10B"


def card_data(f: Facts):
    from huggingface_hub import DatasetCardData

    configs = []
    for i, (name, s) in enumerate(f.subsets.items()):
        configs.append(
            {
                "config_name": name,
                "data_files": [{"split": "train", "path": [x["path"] for x in s.files]}],
                **({"default": True} if i == 0 else {}),
            }
        )
    total = sum(s.rows for s in f.subsets.values())
    return DatasetCardData(
        license=f.license,
        language=f.language,
        task_categories=["text-to-image", "image-to-text"],
        size_categories=[size_category(total)],
        pretty_name=f.pretty_name,
        configs=configs,
        tags=["paragraph-captions", "long-captions", "paradiffusion"],
    )


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(out)


def card_markdown(f: Facts) -> str:
    data = card_data(f)
    c = f.counts
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {f.pretty_name}",
        "",
        f"<!-- paradiffusion-publish-version: {f.version} -->",
        f"Version `{f.version}`, written {f.written_at} by the ParaDiffusion toolkit "
        f"{f.toolkit_version} (`paradiffusion publish`, settings fingerprint `{f.config_fingerprint}`).",
        "",
        "## Subsets",
        "",
        _table(
            ["config", "what", "rows", "Parquet shards", "WebDataset shards"],
            [[n, TITLES[n], f"{s.rows:,}", len(s.files), len(s.wds_files) or "-"] for n, s in f.subsets.items()],
        ),
        "",
        "```python",
        "from datasets import load_dataset",
        *[f'{n} = load_dataset("<this repo or folder>", "{n}", split="train")' for n in f.subsets],
        "```",
        "",
        "DuckDB reads the shards directly: `SELECT * FROM 'data/big/*.parquet'` (list the files of one "
        "version from `croissant.json` when older versions are kept beside it).",
        "",
        "## Columns",
        "",
    ]
    for n, s in f.subsets.items():
        if s.schema is not None:
            lines += [f"**{n}**: " + ", ".join(f"`{fl.name}` ({fl.type})" for fl in s.schema), ""]
    lines += [
        "Each row of `big` carries the selected caption (`caption`, with its model, revision, prompt id and "
        "prompt hash) and every caption the image has (`captions`, each with its source and quality flags). "
        "`small`'s `annotator` and `reviewer` are pseudonyms (a keyed hash: stable across versions, not "
        "reversible without the publisher's key).",
        "",
        "## Licence",
        "",
        f"`{f.license}`. {f.license_note}",
        "",
        "## Statistics",
        "",
        f.stats_markdown or "(the statistics tables were not available for this version)",
        "",
        *[f"![{a}]({a})\n" for a in f.assets],
        "## How it was made",
        "",
        "Images were downloaded with img2dataset, filtered (decode checks, resolution, language, CLIP and "
        "aesthetic scores, duplicates), then captioned by vision-language models with paragraph prompts. "
        "The caption published as `caption` is chosen per image by the captioning stage's selection rule.",
        "",
        "Caption sets (model, revision, prompt):",
        "",
        _table(
            ["model", "revision", "prompt", "prompt hash", "captions", "first", "last"],
            [
                [
                    s["model_id"],
                    s["model_revision"] or "(unpinned)",
                    s["prompt_id"],
                    s["prompt_hash"],
                    f"{s['rows']:,}",
                    s["first"],
                    s["last"],
                ]
                for s in f.caption_sets
            ],
        ),
        "",
    ]
    for name, text in f.prompts.items():
        lines += [f"Prompt `{name}`:", "", "```text", text.strip(), "```", ""]
    lines += [
        "Filter thresholds (as recorded by the filter stage):",
        "",
        "```yaml",
        *(f"{k}: {v}" for k, v in f.thresholds.items()),
        "```" if f.thresholds else "(no filter settings recorded)\n```",
        "",
        "## Safety and consent filters",
        "",
        f"Images kept by the filter: {c.get('kept', 0):,}; removed: {c.get('not_kept', 0):,}; kept but with no "
        f"usable caption (left out of `big`): {c.get('no_caption', 0):,}.",
        "",
        _table(["removed because", "images"], [[r, f"{n:,}"] for r, n in c.get("reject_reasons", {}).items()]),
        "",
        "Opt-out: the rows keep the source URL; a site owner who wants an image removed can ask the "
        "publisher, and the next version leaves it out. "
        + (
            "An NSFW score is published per image. "
            if c.get("has_nsfw")
            else "No NSFW classifier was run: the data may contain unsafe images. "
        )
        + ("A watermark score is published per image." if c.get("has_watermark") else "No watermark detector was run."),
        "",
    ]
    if c.get("images_skipped"):
        lines += [f"Images that failed to decode and were left out: {c['images_skipped']:,}.", ""]
    lines += ["## Known limitations", "", *[f"- {x}" for x in LIMITATIONS], "", "## Citation", "", CITATIONS, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Croissant
_CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}


def _datatype(t: pa.DataType) -> str | None:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "sc:Text"
    if pa.types.is_integer(t):
        return "sc:Integer"
    if pa.types.is_floating(t):
        return "sc:Float"
    if pa.types.is_boolean(t):
        return "sc:Boolean"
    return None  # lists, structs, images: described in the card, not as Croissant fields


def croissant(f: Facts) -> dict:
    """Croissant 1.0 JSON-LD: one FileObject (with sha256) per Parquet shard, one FileSet and one
    RecordSet per subset with a field per scalar column."""
    dist: list[dict] = []
    records: list[dict] = []
    for n, s in f.subsets.items():
        for x in s.files:
            dist.append(
                {
                    "@type": "cr:FileObject",
                    "@id": x["path"],
                    "name": x["path"],
                    "contentUrl": x["path"],
                    "contentSize": f"{x['bytes']} B",
                    "encodingFormat": "application/x-parquet",
                    "sha256": x["sha256"],
                }
            )
        dist.append(
            {
                "@type": "cr:FileSet",
                "@id": f"{n}-parquet",
                "name": f"{n}-parquet",
                "description": f"The Parquet shards of the {n} subset (this version's files only).",
                "encodingFormat": "application/x-parquet",
                "includes": [x["path"] for x in s.files],
            }
        )
        fields = []
        for fl in s.schema or []:
            dt = _datatype(fl.type)
            if dt is None:
                continue
            fields.append(
                {
                    "@type": "cr:Field",
                    "@id": f"{n}/{fl.name}",
                    "name": f"{n}/{fl.name}",
                    "dataType": dt,
                    "source": {"fileSet": {"@id": f"{n}-parquet"}, "extract": {"column": fl.name}},
                }
            )
        records.append(
            {
                "@type": "cr:RecordSet",
                "@id": n,
                "name": n,
                "description": TITLES[n],
                "key": {"@id": f"{n}/key"},
                "field": fields,
            }
        )
    return {
        "@context": _CONTEXT,
        "@type": "sc:Dataset",
        "name": f.pretty_name,
        "description": "; ".join(TITLES[n] for n in f.subsets) + ".",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "license": f.license,
        "url": f.url or "https://huggingface.co/datasets",
        "version": "1.0.0",
        "datePublished": f.written_at[:10],
        "citeAs": "Wu et al., Paragraph-to-Image Generation with Information-Enriched Diffusion Model, arXiv:2311.14284",
        "keywords": ["text-to-image", "paragraph captions"],
        "distribution": dist,
        "recordSet": records,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
