"""The layers hold: core (paradiffusion/) <- stages <- composition (pipelines/).

Read statically (ast over every module, imports inside functions and ``if TYPE_CHECKING:``
blocks included), so a lazy import cannot slip through, plus one run that imports the
whole core and looks at what got loaded (catches ``importlib`` by name).

Deliberate exceptions, each pinned here so that a stale one fails too:

- ``paradiffusion/__main__.py`` imports ``pipelines.cli`` so ``python -m paradiffusion``
  keeps working (it is the entry point, not part of the core's API; nothing imports it).
- ``paradiffusion/testing/tiny_clip.py`` and ``tiny_cogvlm.py`` build test fixtures from a
  stage's own model class (the LAION aesthetic head, native CogVLM), inside the builder
  functions only: importing ``paradiffusion.testing`` loads no stage.
- Stages may use each other where one reuses another's code (:data:`STAGE_EDGES`); a new
  edge fails this test until it is added here on purpose.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = "paradiffusion"
STAGES = {"curation", "captioning", "training", "eval", "stats", "publish"}
TOP = "pipelines"

#: core module (path from the repo root) -> the upper-layer packages it may import, and why
CORE_EXCEPTIONS = {
    "paradiffusion/__main__.py": {TOP},  # `python -m paradiffusion` runs pipelines.cli.main
    "paradiffusion/testing/tiny_clip.py": {"curation"},  # saves a random curation.models.AestheticPredictor
    "paradiffusion/testing/tiny_cogvlm.py": {"captioning"},  # builds a random native captioning.cogvlm model
}
#: stage -> the other stages it imports today (reused code, all imported lazily)
STAGE_EDGES = {
    "captioning": {"curation"},
    "eval": {"captioning", "curation", "training"},
    "stats": {"captioning"},
    "publish": {"captioning", "stats"},
}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level package, line, inside a function) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _upper_imports(path: Path, upper: set[str]) -> dict[str, list[tuple[int, bool]]]:
    out: dict[str, list[tuple[int, bool]]] = {}
    for pkg, line, in_function in _imports(path):
        if pkg in upper:
            out.setdefault(pkg, []).append((line, in_function))
    return out


def test_the_core_imports_no_stage_and_not_the_composition_layer():
    bad, used = [], {}
    for path in _modules(CORE):
        rel = path.relative_to(REPO).as_posix()
        found = _upper_imports(path, STAGES | {TOP})
        allowed = CORE_EXCEPTIONS.get(rel, set())
        used[rel] = set(found) & allowed
        for pkg, where in found.items():
            if pkg not in allowed:
                bad += [f"{rel}:{line} imports {pkg}" for line, _ in where]
            elif rel.startswith("paradiffusion/testing/"):
                bad += [f"{rel}:{line} imports {pkg} at module level" for line, lazy in where if not lazy]
    assert not bad, "the core (paradiffusion/) must not import a stage or pipelines/:\n" + "\n".join(bad)
    stale = {rel: pkgs - used.get(rel, set()) for rel, pkgs in CORE_EXCEPTIONS.items()}
    assert not any(stale.values()), f"exceptions no longer needed, remove them from CORE_EXCEPTIONS: {stale}"


def test_no_stage_imports_the_composition_layer_and_cross_stage_imports_are_the_known_ones():
    bad, edges = [], {}
    for stage in sorted(STAGES):
        for path in _modules(stage):
            rel = path.relative_to(REPO).as_posix()
            found = _upper_imports(path, STAGES | {TOP})
            bad += [f"{rel}:{line} imports {TOP}" for line, _ in found.pop(TOP, [])]
            for other, where in found.items():
                if other == stage:
                    continue
                edges.setdefault(stage, set()).add(other)
                if other not in STAGE_EDGES.get(stage, set()):
                    bad += [f"{rel}:{line} imports stage {other}" for line, _ in where]
    assert not bad, "a stage must not import pipelines/, and new stage -> stage imports are deliberate:\n" + "\n".join(
        bad
    )
    assert edges == STAGE_EDGES, f"stage -> stage imports changed: now {edges}; update STAGE_EDGES"


def test_importing_the_whole_core_loads_no_stage():
    code = (
        "import pkgutil, importlib, sys, paradiffusion\n"
        "for m in pkgutil.walk_packages(paradiffusion.__path__, 'paradiffusion.'):\n"
        "    if m.name != 'paradiffusion.__main__' and not m.name.startswith('paradiffusion.testing'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(STAGES | {TOP})!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]", f"importing the core loaded: {out.strip()}"
