import pytest

from paradiffusion.config import ConfigError
from pipelines.config import load_config
from stats.queries import bucket_case, bucket_labels


def test_bucket_labels_and_sql_agree():
    assert bucket_labels([25, 50, 100]) == ["<25", "25-49", "50-99", ">=100"]
    import duckdb

    con = duckdb.connect()
    got = [con.execute(f"SELECT {bucket_case(str(n), [25, 50, 100])}").fetchone()[0] for n in (0, 24, 25, 99, 100, 900)]
    assert got == [0, 0, 1, 2, 3, 3]


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"stats.length_buckets.*strictly increasing"):
        load_config([], ["stats.length_buckets=[50, 25]"])
    with pytest.raises(ConfigError, match=r"annotations.*min_words \(300\) must be <= max_words"):
        load_config([], ["annotations.min_words=300"])
    with pytest.raises(ConfigError, match=r"select_small.diversity.*one of 'kmeans', 'none'"):
        load_config([], ["select_small.diversity=random"])
    with pytest.raises(ConfigError, match=r"stats.nounz: unknown key"):
        load_config([], ["stats.nounz=off"])


def test_nouns_off_is_the_word_even_where_yaml_reads_a_boolean(tmp_path):
    assert load_config([], ["stats.nouns=off"]).stats.nouns == "off"
    f = tmp_path / "extra.yaml"
    f.write_text("stats:\n  nouns: off\n")
    assert load_config([str(f)], []).stats.nouns == "off"
    with pytest.raises(ConfigError, match=r"stats.nouns"):
        load_config([], ["stats.nouns=on"])
