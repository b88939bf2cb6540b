"""The eval commands' config checks and the vote-admin CLI."""

from __future__ import annotations

import yaml

from paradiffusion.config import ConfigError
from pipelines.cli import main
from pipelines.config import load_config


def _cfg(tmp_path, eval_section: dict) -> str:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"project": {"data_root": str(tmp_path / "data")}, "eval": eval_section}))
    return str(f)


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["eval-generate", "--config", _cfg(tmp_path, {})]) == 2
    assert "eval.models is empty" in capsys.readouterr().err
    bad = {"models": {"a": {"kind": "diffusers", "path": "x"}}, "vote": {"comparisons": [["a", "zzz"]]}}
    assert main(["eval-generate", "--config", _cfg(tmp_path, bad)]) == 2
    assert "'zzz' is not defined" in capsys.readouterr().err
    try:
        load_config([_cfg(tmp_path, {"models": {"a b": {"kind": "diffusers", "path": "x"}}})])
        raise AssertionError("a model name with a space must not validate")
    except ConfigError as exc:
        assert "must match" in str(exc)
    empty_cache = ["--set", f"models.cache_dir={tmp_path / 'models'}"]
    assert main(["eval", "--config", _cfg(tmp_path, {}), *empty_cache]) == 2  # models are resolved first
    assert "eval.metrics.clip_pretrained = openai" in capsys.readouterr().err
    assert main(["eval", "--config", _cfg(tmp_path, {"metrics": {"clip_pretrained": None}})]) == 2
    assert "run `make eval-generate` first" in capsys.readouterr().err


def test_vote_admin_invite_progress_export(tmp_path, capsys, make_images):
    make_images(tmp_path / "data" / "eval" / "images")
    cfg = _cfg(tmp_path, {})
    assert main(["vote-admin", "pairs", "--config", cfg]) == 0
    assert main(["vote-admin", "invite", "ann", "bob", "--config", cfg, "--base-url", "http://h:1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("ann\tvoter\t") and "http://h:1/vote?t=" in lines[0]
    token = lines[0].split("\t")[2]
    from eval.vote.admin import open_store

    store = open_store(load_config([cfg]))
    assert store.voter_for(token).name == "ann" and store.n_pairs() == 4
    assert main(["vote-admin", "revoke", "ann", "--config", cfg]) == 0
    assert store.voter_for(token) is None
    assert main(["vote-admin", "progress", "--config", cfg]) == 0
    assert '"pairs": 4' in capsys.readouterr().out
    assert main(["vote-admin", "export", "--config", cfg]) == 0
    assert (tmp_path / "data" / "eval" / "votes" / "export" / "part-votes.parquet").is_file()
