"""`paradiffusion publish` with publish.repo_id: the upload to the Hub, against a local stand-in.

No real Hub can be reached where these tests run, so the upload is tested against the Hub
stand-in of paradiffusion.testing.fake_hub on 127.0.0.1, not against the Hub: huggingface_hub's
own client (not mocked) creates the dataset repo and uploads the folder over HTTP
(``/api/repos/create``, ``/api/validate-yaml``, ``/api/datasets/<repo>/preupload/main``, the git
LFS batch API with basic PUT + verify, ``/api/datasets/<repo>/commit/main``).

The stand-in is a git LFS server. huggingface_hub 2.x uploads every LFS file through Xet whenever
hf_xet is installed, and the server has no say in it, so these tests set HF_HUB_DISABLE_XET=1, the
variable huggingface_hub documents for that: the Xet transfer of a real upload is not tested here.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE (tests/conftest.py sets it to 1), HF_HUB_DISABLE_XET
and HF_HOME when it is imported, which has happened before a test runs: the ``hub`` fixture sets the
variables and the values huggingface_hub.constants read from them, as a fresh process would see them.
The token is read from HF_TOKEN at each request, so the tests set and unset the variable only.
"""

from __future__ import annotations

import random
import secrets

import pyarrow as pa
import pytest

from paradiffusion.config import ConfigError
from paradiffusion.testing.fake_hub import GITATTRIBUTES, FakeHub
from publish.run import run_publish

REPO = "test-user/paraimage"
TOKEN = "hf_" + secrets.token_hex(16)  # the token the stand-in takes: a fresh value, so a leak cannot hide


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, HF_ENDPOINT at it, no token anywhere (no HF_TOKEN, an empty HF_HOME), Xet off."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    with FakeHub(token=TOKEN) as server:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home)}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        yield server
        assert not server.errors, server.errors[0]  # the stand-in failed on a request (answered 500)


def _folder(out) -> dict[str, bytes]:
    """What the upload must send: every file of the folder but _publish/** (and temp files, of which none remain)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    return {rel: b for rel, b in files.items() if not rel.startswith("_publish/") and ".tmp-" not in rel}


def _remote(hub: FakeHub) -> dict[str, bytes]:
    """The repo's files at main, without the .gitattributes the Hub writes when it creates a repo."""
    files = hub.files(REPO)
    assert files.pop(".gitattributes") == GITATTRIBUTES
    return files


def _header(headers: dict, name: str) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get(name.lower())


def test_publish_uploads_the_folder_as_a_private_dataset_repo(data, make_cfg, monkeypatch, hub, tmp_path):
    root, _ = data
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_publish(make_cfg(root, "publish.shard_rows=7", f"publish.repo_id={REPO}", "publish.private=true"))
    out = root / "paraimage"
    assert REPO in hub.datasets and REPO not in hub.repos  # a dataset repo
    assert hub.datasets[REPO].private
    local = _folder(out)
    assert any(rel.startswith("data/big/") for rel in local) and (out / "_publish" / "_summary.json").exists()
    assert _remote(hub) == local  # every file, byte for byte; nothing of _publish/
    # README.md / croissant.json as regular files in the commit, shards and plots through git LFS
    commit = hub.datasets[REPO].log[-1]
    assert "README.md" in commit["regular"] and "croissant.json" in commit["regular"]
    assert {r for r in local if r.endswith((".parquet", ".png"))} == set(commit["lfs"])
    # the token from HF_TOKEN on every API request; none to the storage URLs, and no Xet
    for method, path, headers in hub.requests:
        if path.startswith("/lfs-storage/"):
            assert method == "PUT" and _header(headers, "Authorization") is None
        elif method == "POST" and path != "/api/validate-yaml":
            assert _header(headers, "Authorization") == f"Bearer {TOKEN}", path
    assert sum(p.startswith("/lfs-storage/") for _, p, _ in hub.requests) == len(commit["lfs"])
    assert not [p for _, p, _ in hub.requests if "xet" in p.lower()]
    # read back with the client: snapshot_download of the dataset repo equals the folder
    from huggingface_hub import snapshot_download

    snap = snapshot_download(REPO, repo_type="dataset", cache_dir=tmp_path / "download")
    from pathlib import Path

    got = {p.relative_to(snap).as_posix(): p.read_bytes() for p in Path(snap).rglob("*") if p.is_file()}
    got.pop(".gitattributes")
    assert got == local


def test_no_token_stops_before_any_request(data, make_cfg, hub):
    root, _ = data
    with pytest.raises(ConfigError, match=r"publish\.repo_id.*HF_TOKEN"):
        run_publish(make_cfg(root, f"publish.repo_id={REPO}"))
    assert hub.requests == [] and hub.datasets == {}
    assert not (root / "paraimage").exists()  # checked before any work: no folder written first


def test_republish_uploads_the_changes_and_leaves_removed_files_on_the_hub(
    data, make_cfg, monkeypatch, hub, new_caption
):
    root, raw = data
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = make_cfg(root, "publish.shard_rows=7", f"publish.repo_id={REPO}", "publish.private=false")
    out = root / "paraimage"
    run_publish(cfg)
    assert not hub.datasets[REPO].private
    first = _folder(out)
    assert _remote(hub) == first
    # new captions for the keys of the last chunk: one shard, the card, croissant.json change
    from paradiffusion.schemas import CAPTIONS
    from paradiffusion.storage import Table

    rng = random.Random(1)
    new = [new_caption(rng, k, "qwen", 30, 100) for k in raw["kept"] if int(k) >= 25]
    Table(str(root / "captions"), CAPTIONS).write_shard("qwen-00000", pa.Table.from_pylist(new, schema=CAPTIONS))
    assert run_publish(cfg)["shards_written"] == 1
    second = _folder(out)
    assert _remote(hub) == second
    changed = {rel for rel, b in second.items() if first.get(rel) != b}
    assert {"README.md", "croissant.json"} < changed and len(changed) < len(second)
    commit = hub.datasets[REPO].log[-1]
    assert set(commit["regular"] + commit["lfs"]) == changed  # the unchanged files are not sent again
    # A third run removes the first version's replaced shard and plots from the folder
    # (publish.keep_versions=2). upload_folder adds and replaces files, it does not delete: they stay
    # in the repo. The card's `configs` and croissant.json name this version's files one by one (and
    # the card its plots), so load_dataset and Croissant readers do not read them; they are only
    # stale files in the repo's listing.
    run_publish(cfg)
    third = _folder(out)
    stale = set(first) - set(third)
    assert any(rel.startswith("data/big/") for rel in stale)
    remote = _remote(hub)
    assert set(remote) == set(third) | stale
    assert {rel: remote[rel] for rel in third} == third
    from huggingface_hub import DatasetCard

    card = DatasetCard(remote["README.md"].decode())
    named = {p for c in card.data.to_dict()["configs"] for f in c["data_files"] for p in f["path"]}
    assert named and named <= set(third)
    assert not [s for s in stale if s in card.content or s in remote["croissant.json"].decode()]


def test_the_token_is_never_written_or_printed(data, make_cfg, monkeypatch, hub, capfd, caplog):
    root, _ = data
    cfg = make_cfg(root, f"publish.repo_id={REPO}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_publish(cfg)
    assert _remote(hub) == _folder(root / "paraimage")  # the upload ran, with the token on its requests
    # a token the stand-in does not take: the Hub's 401, and that token is not shown either
    from huggingface_hub.errors import HfHubHTTPError

    refused = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", refused)
    n_before = len(hub.requests)
    with pytest.raises(HfHubHTTPError, match="401") as err:
        run_publish(cfg)
    assert any(_header(h, "Authorization") == f"Bearer {refused}" for _, _, h in hub.requests[n_before:])
    captured = capfd.readouterr()
    texts = [captured.out, captured.err, caplog.text, str(err.value), repr(err.value)]
    texts += [p.read_bytes().decode(errors="replace") for p in root.rglob("*") if p.is_file()]
    for token in (TOKEN, refused):
        assert not [t for t in texts if token in t]
