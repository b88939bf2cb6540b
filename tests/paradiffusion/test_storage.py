import json

import pyarrow as pa
import pytest

from paradiffusion.schemas import SCORES
from paradiffusion.stage import StageSummary
from paradiffusion.storage import Table, conform
from pipelines.config import load_config


def scores(keys, kept=True):
    return pa.Table.from_pylist([{"key": k, "shard": "s", "kept": kept} for k in keys], schema=SCORES)


def test_write_commit_and_read(tmp_path):
    t = Table(str(tmp_path / "scores"), SCORES)
    assert t.done_shards() == set() and t.read().num_rows == 0
    t.write_shard("00000", scores(["a", "b"]))
    t.write_shard("00001", scores(["c"]))
    assert t.done_shards() == {"00000", "00001"}
    assert sorted(t.read(columns=["key"])["key"].to_pylist()) == ["a", "b", "c"]
    assert t.count_rows() == 3
    assert t.marker("00000")["rows"] == 2
    assert not list((tmp_path / "scores" / ".tmp").iterdir())


def test_rewrite_replaces_not_duplicates(tmp_path):
    t = Table(str(tmp_path / "scores"), SCORES)
    t.write_shard("00000", scores(["a", "b"]))
    t.write_shard("00000", scores(["a", "b"], kept=False))
    got = t.read()
    assert got.num_rows == 2 and got["kept"].to_pylist() == [False, False]


def test_uncommitted_files_are_invisible_and_cleaned(tmp_path):
    t = Table(str(tmp_path / "scores"), SCORES)
    t.write_shard("00000", scores(["a"]))
    # A killed writer: a half-written temp file, and a moved shard whose marker never came.
    (tmp_path / "scores" / ".tmp" / "junk.parquet").write_bytes(b"PAR1 half")
    (tmp_path / "scores" / "part-00001.parquet").write_bytes(b"PAR1 half")
    assert t.done_shards() == {"00000"}
    assert t.read().num_rows == 1
    assert t.clean_tmp() == 2
    assert not (tmp_path / "scores" / "part-00001.parquet").exists()
    assert (tmp_path / "scores" / "part-00000.parquet").exists()


def test_conform_checks_schema():
    with pytest.raises(ValueError, match="not in the table schema"):
        conform(pa.table({"key": ["a"], "shard": ["s"], "kept": [True], "bogus": [1]}), SCORES)
    with pytest.raises(ValueError, match="required column 'kept'"):
        conform(pa.table({"key": ["a"], "shard": ["s"]}), SCORES)
    t = conform(pa.table({"kept": [True], "key": ["a"], "shard": ["s"]}), SCORES)
    assert t.schema == SCORES and t["aesthetic"].null_count == 1


def test_bad_shard_name(tmp_path):
    with pytest.raises(ValueError, match="shard name"):
        Table(str(tmp_path / "t"), SCORES).write_shard("../evil", scores(["a"]))


def test_save_config_and_summary(tmp_path, caplog):
    cfg = load_config([], [f"project.data_root={tmp_path}"])
    t = Table(str(tmp_path / "scores"), SCORES)
    t.save_config(cfg, "filter", cfg.project)
    t.write_shard("00000", scores(["a"]))
    import yaml

    doc = yaml.safe_load((tmp_path / "scores" / "_config.yaml").read_text())
    assert doc["stage"] == "filter" and doc["config"]["project"]["data_root"] == str(tmp_path)
    s = StageSummary("filter", n_in=3, n_out=1)
    s.reject("too_small", 2)
    t.save_json("_summary.json", s.finish().to_dict())
    saved = json.loads((tmp_path / "scores" / "_summary.json").read_text())
    assert saved["rejected"] == {"too_small": 2} and saved["in"] == 3
    assert "rejected: too_small" in s.render()


def test_works_over_fsspec_memory_url():
    t = Table("memory://pd-test/scores", SCORES)
    t.write_shard("00000", scores(["a", "b"]))
    assert t.read().num_rows == 2
    (f,) = t.files()
    assert f.startswith("memory://") and f.endswith("pd-test/scores/part-00000.parquet")


def test_config_names_the_shards_other_settings_made(tmp_path, caplog):
    import yaml

    cfg = load_config([], [f"project.data_root={tmp_path}"])
    t = Table(str(tmp_path / "scores"), SCORES)
    t.save_config(cfg, "filter", {"threshold": 1})
    t.write_shard("00000", scores(["a"]))
    t.write_shard("00001", scores(["b"]))
    old_fp = t.marker("00000")["config_fingerprint"]
    assert (tmp_path / "scores" / "_configs" / f"{old_fp}.yaml").is_file()

    # A run with other settings: the document says which shards it did not make, every time.
    for _ in range(2):
        caplog.clear()
        t2 = Table(str(tmp_path / "scores"), SCORES)
        doc = t2.save_config(cfg, "filter", {"threshold": 2})
        assert doc["shards_with_other_settings"] == {old_fp: 2}
        assert "2 of its shards were written with other filter settings" in caplog.text
    on_disk = yaml.safe_load((tmp_path / "scores" / "_config.yaml").read_text())
    assert on_disk["shards_with_other_settings"] == {old_fp: 2} and on_disk["stage_settings"] == {"threshold": 2}
    t2.write_shard("00000", scores(["a"]))  # rewritten under the new settings
    assert t2.save_config(cfg, "filter", {"threshold": 2})["shards_with_other_settings"] == {old_fp: 1}
    t2.write_shard("00001", scores(["b"]))
    assert "shards_with_other_settings" not in t2.save_config(cfg, "filter", {"threshold": 2})
    # Both configurations stay on record by fingerprint.
    assert len(list((tmp_path / "scores" / "_configs").glob("*.yaml"))) == 2


def test_shards_from_before_fingerprints_count_as_the_old_config(tmp_path):
    cfg = load_config([], [f"project.data_root={tmp_path}"])
    t = Table(str(tmp_path / "scores"), SCORES)
    t.write_shard("00000", scores(["a"]))  # no save_config yet: a marker without a fingerprint
    (tmp_path / "scores" / "_config.yaml").write_text("stage_fingerprint: old\n")
    assert t.save_config(cfg, "filter", {"x": 1})["shards_with_other_settings"] == {"old": 1}
