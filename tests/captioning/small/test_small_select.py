import numpy as np
import pytest
import yaml

from captioning.small.select import kmeans, run_select_small
from paradiffusion.schemas import CANDIDATES
from paradiffusion.storage import Table


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(c, 0.05, (20, 2)) for c in ((0, 0), (5, 5), (0, 5))])
    labels, centroids = kmeans(x, 3, seed=0)
    groups = [set(labels[i * 20 : (i + 1) * 20]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert np.array_equal(kmeans(x, 3, seed=0)[0], labels)  # deterministic
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_select_takes_best_of_each_cluster_first(cfg, data_root):
    summary = run_select_small(cfg)
    got = Table(str(data_root / "candidates"), CANDIDATES).read().sort_by("selection_rank").to_pylist()
    assert [r["selection_rank"] for r in got] == list(range(1, 7))
    # the first three are the best of the three clusters (c2_0 > c1_0 > c0_0 by score), then the seconds
    assert [r["key"] for r in got[:3]] == ["c2_0", "c1_0", "c0_0"]
    assert [r["key"] for r in got[3:]] == ["c2_1", "c1_1", "c0_1"]
    assert len({r["cluster"] for r in got[:3]}) == 3
    assert all(r["rank_in_cluster"] == 1 and r["cluster_size"] == 4 for r in got[:3])
    assert "best of cluster" in got[0]["reason"] and "short side 1200 px" in got[0]["reason"]
    assert got[0]["short_side"] == 1200
    d = summary.to_dict()
    # in = kept (15); every kept image not chosen is counted with its reason
    assert d["in"] == 15 and d["out"] == 6
    assert d["rejected"] == {
        "short_side_below_min": 1,
        "aesthetic_below_min": 1,
        "no_image_embedding": 1,
        "not_selected": 6,
    }
    doc = yaml.safe_load((data_root / "candidates" / "_config.yaml").read_text())
    assert "shards_with_other_settings" not in doc  # the shard it just wrote carries its own settings
    assert (data_root / "candidates" / "_summary.json").exists()


def test_select_rerun_replaces_and_diversity_none(cfg, data_root):
    run_select_small(cfg)
    cfg.select_small.diversity = "none"
    cfg.select_small.n_candidates = 3
    summary = run_select_small(cfg)
    got = Table(str(data_root / "candidates"), CANDIDATES).read().sort_by("selection_rank").to_pylist()
    assert [r["key"] for r in got] == ["noemb", "c2_0", "c1_0"]  # top by score, embeddings not needed
    assert all(r["cluster"] == -1 for r in got)
    assert "no_image_embedding" not in summary.rejected
    # the rerun rewrote the selection with the new settings: nothing is claimed for the old ones
    doc = yaml.safe_load((data_root / "candidates" / "_config.yaml").read_text())
    assert "shards_with_other_settings" not in doc and doc["stage_settings"]["diversity"] == "none"


def test_select_without_scores_says_what_to_run(cfg, tmp_path):
    cfg.project.data_root = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="make filter"):
        run_select_small(cfg)


def test_cli_and_no_minimum_score(data_root):
    from pipelines.cli import main

    sets = [
        f"project.data_root={data_root}",
        "select_small.min_aesthetic=null",
        "select_small.min_short_side=1000",
        "select_small.n_candidates=20",
        "select_small.n_clusters=3",
    ]
    assert main(["select-small", *[a for s in sets for a in ("--set", s)]]) == 0
    got = Table(str(data_root / "candidates"), CANDIDATES).read()
    assert "ugly" in got["key"].to_pylist() and got.num_rows == 13  # 12 + the low-scored one; 'noemb' has no embedding
    assert main(["select-small", "--set", f"project.data_root={data_root / 'none'}"]) == 1


def test_kmeans_without_any_embedding_says_what_to_set(tmp_path):
    import pyarrow as pa

    from paradiffusion.config import ConfigError
    from paradiffusion.schemas import SCORES
    from pipelines.cli import main
    from pipelines.config import load_config

    root = tmp_path / "data"
    rows = [{"key": "a", "shard": "0", "width": 2000, "height": 2000, "aesthetic": 8.0, "kept": True}]
    Table(str(root / "scores"), SCORES).write_shard("0", pa.Table.from_pylist(rows, schema=SCORES))
    cfg = load_config([], [f"project.data_root={root}"])
    with pytest.raises(ConfigError, match="filter.save_embeddings=true"):
        run_select_small(cfg)
    assert main(["select-small", "--set", f"project.data_root={root}", "--set", "select_small.diversity=none"]) == 0
