"""README's "open the stats of an s3:// data root in DuckDB" runs as written, against moto's S3
server on 127.0.0.1: the snippet is taken from README.md (so the docs cannot drift from what is
tested), run in a shell after `paradiffusion stats` wrote `stats.duckdb` for a data root on S3."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from paradiffusion.schemas import SCORES
from paradiffusion.storage import Table
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Object storage"


def readme_snippet() -> str:
    """The bash block of README's object storage section that opens stats.duckdb through duckdb_connect."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"^ *```bash\n(.*?)^ *```", section, flags=re.S | re.M)
    found = [b for b in blocks if "duckdb_connect" in b]
    assert len(found) == 1, f"README's {SECTION} section must hold one bash block with duckdb_connect"
    lines = found[0].splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[indent:] for ln in lines) + "\n"


def _python_of(snippet: str) -> str:
    m = re.fullmatch(r'\.venv/bin/python -c "\n(.*)"\n', snippet, flags=re.S)
    assert m, f'the README snippet is not `.venv/bin/python -c "..."`:\n{snippet}'
    return m.group(1)


def test_the_readme_snippet_is_python_that_names_what_exists():
    """The fast half (the default suite): the snippet compiles and everything it imports exists."""
    import ast
    import importlib

    tree = ast.parse(_python_of(readme_snippet()))
    imported = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert ("paradiffusion.storage", "duckdb_connect") in imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"README imports {module}.{name}, which does not exist"


@pytest.mark.slow  # ~25 s on a loaded 2-core machine: a stats run and a fresh interpreter's imports
def test_the_readme_snippet_opens_the_stats_of_an_s3_data_root(s3_root, tmp_path, capfd, monkeypatch):
    root = f"{s3_root}/data"
    scores = Table(f"{root}/scores", SCORES)
    rows = [{"key": f"k{i}", "shard": "0", "kept": i % 3 != 0, "width": 64, "height": 64} for i in range(7)]
    scores.write_shard("00000", pa.Table.from_pylist(rows, schema=SCORES))
    # a shard whose marker never came: the views (and so the snippet) must not count it
    stray = [{"key": f"x{i}", "shard": "1", "kept": True} for i in range(50)]
    scores.write_shard("00001", pa.Table.from_pylist(stray, schema=SCORES))
    scores.fs.rm_file(scores.marker_file("00001"))
    # `make stats` for the data root on S3, its report folder local (data/stats, as the snippet opens it)
    monkeypatch.chdir(tmp_path)
    argv = ["stats", "--config", os.devnull, "--set", f"project.data_root={root}", "--set", "stats.output=data/stats"]
    for s in ("stats.plots=false", "stats.nouns='off'", "stats.derived=false", "stats.partials=false"):
        argv += ["--set", s]
    rc = main(argv)
    out = capfd.readouterr()
    assert rc == 0, out.err[-3000:]
    assert (tmp_path / "data" / "stats" / "stats.duckdb").is_file()

    snippet = readme_snippet()
    _python_of(snippet)
    # the interpreter is this test's own (a venv's python cannot be linked elsewhere); the rest runs as written,
    # in a folder with no pipelines.yaml, so the endpoint and credentials come from the AWS variables
    script = snippet.replace(".venv/bin/python", f'"{sys.executable}"', 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"│\s*(true|false)\s*│\s*(\d+)\s*│", r.stdout)}
    assert counts == {"true": 4, "false": 3}, r.stdout
