"""The lock files and the tool that makes, installs and checks them (scripts/envlock.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("envlock", REPO / "scripts" / "envlock.py")
envlock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(envlock)

LOCK = REPO / "requirements" / "lock.txt"
LS_LOCK = REPO / "requirements" / "labelstudio-lock.txt"


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "envlock.py"), *args], capture_output=True, text=True, **kw
    )


@pytest.mark.parametrize("lock", [LOCK, LS_LOCK], ids=["main", "labelstudio"])
def test_every_package_of_a_lock_is_pinned_exactly_with_hashes(lock):
    pins = envlock.parse_lock(lock)
    blocks = envlock.lock_blocks(lock)
    assert len(blocks) == len(pins) > 50
    for name, block in blocks:
        assert "--hash=sha256:" in block, f"{name} has no hash"
    assert lock.read_text().startswith(f"# lock-for: python {envlock.PYTHON_VERSION} {envlock.PYTHON_PLATFORM}")


def test_the_main_lock_holds_pyprojects_pins():
    """pyproject's direct pins are the source of truth; the lock must agree with each of them."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    pins = envlock.parse_lock(LOCK)
    checked = 0
    for r in reqs:
        name, _, rest = r.partition("==")
        name = envlock.canonical(name.split("[")[0].strip())
        if rest and name != envlock.canonical(envlock.PROJECT):
            assert pins.get(name) == rest.split(";")[0].strip(), f"{name}: pyproject {rest}, lock {pins.get(name)}"
            checked += 1
    assert checked > 20
    assert envlock.canonical(envlock.PROJECT) not in pins  # installed editable, never locked


def test_label_studio_lock_keeps_sentry_below_3():
    """sentry-sdk 3.0 breaks label-studio 1.23.2's start-up (Unknown option 'send_default_pii')."""
    pins = envlock.parse_lock(LS_LOCK)
    assert pins["label-studio"] == "1.23.2"
    assert int(pins["sentry-sdk"].split(".")[0]) < 3


def test_lock_is_refused_when_a_line_is_not_an_exact_pin(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy>=1.0\n")
    with pytest.raises(envlock.LockError, match=r"lock.txt:1: not an exact pin"):
        envlock.parse_lock(bad)


def test_check_names_what_differs_in_one_line(tmp_path):
    """The CI's first step: this very interpreter's environment against a lock that disagrees with it."""
    venv = Path(sys.prefix)
    have = envlock.installed(venv)
    lock = tmp_path / "lock.txt"
    lines = [f"{n}=={v}" for n, v in sorted(have.items()) if n != envlock.canonical(envlock.PROJECT)]
    lines = [ln if not ln.startswith("pyyaml==") else "pyyaml==0.0.1" for ln in lines]
    lines.append("not-installed-anywhere-pd==1.0")
    lock.write_text("\n".join(lines) + "\n")
    r = _run("check", "--venv", str(venv), "--lock", str(lock), timeout=300)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert "2 differ" in err[0] and "pyyaml" in err[0] and "(locked 0.0.1)" in err[0]
    assert "not-installed-anywhere-pd missing" in err[0] and "make setup" in err[0]

    lock.write_text("\n".join(ln for ln in lines if not ln.startswith(("pyyaml", "not-installed"))) + "\n")
    r = _run("check", "--venv", str(venv), "--lock", str(lock), timeout=300)
    assert r.returncode == 1 and "pyyaml" in r.stderr and "not in the lock" in r.stderr


def test_an_unsatisfiable_lock_stops_setup_with_the_package_and_the_fix(tmp_path):
    """A locked release that the index no longer serves: one line naming it and `make lock`, not a traceback."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    lock = tmp_path / "lock.txt"
    lock.write_text("gone-from-the-index-pd==1.0.3 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    empty = tmp_path / "empty-index"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": "/dev/null"}
    r = subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(REPO / "scripts" / "envlock.py"),
            "install",
            "--venv",
            str(venv),
            "--lock",
            str(lock),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "gone-from-the-index-pd==1.0.3" in err[0] and "`make lock`" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("venv", "lock"), [(".venv", LOCK), (".venv-labelstudio", LS_LOCK)], ids=["main", "labelstudio"]
)
def test_make_setup_installed_exactly_the_lock(venv, lock):
    """After `make setup` (CI runs it on a fresh machine first), each venv holds exactly its lock
    (`pip freeze` against the lock; only this project's editable install is ignored)."""
    path = REPO / venv
    if not (path / "bin" / "python").exists():
        pytest.skip(f"{venv} is not installed here (make setup)")
    freeze = subprocess.run(
        [str(path / "bin" / "python"), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    have = {}
    for line in freeze.splitlines():
        if "==" in line:
            n, v = line.split("==", 1)
            have[envlock.canonical(n)] = v.strip()
    have.pop(envlock.canonical(envlock.PROJECT), None)
    want = envlock.parse_lock(lock)
    assert have == want, envlock.diff_pins(want, have)
