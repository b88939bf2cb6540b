import pytest

from paradiffusion.config import ConfigError, apply_overrides
from pipelines.cli import main
from pipelines.config import load_config


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "project:\n  data_root: /x\n")
    cfg = load_config(p, ["project.seed=7", "ray.address=auto"])
    assert cfg.project.data_root == "/x"
    assert cfg.project.seed == 7
    assert cfg.ray.address == "auto"


def test_later_files_override_earlier(tmp_path):
    a = write(tmp_path, "project:\n  data_root: /a\n  seed: 3\n", "a.yaml")
    b = write(tmp_path, "project:\n  data_root: /b\n", "b.yaml")
    cfg = load_config([a, b])
    assert (cfg.project.data_root, cfg.project.seed) == ("/b", 3)


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    p = write(tmp_path, "ray:\n  adress: auto\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "ray.adress" in msg and "unknown key" in msg and "address" in msg


def test_out_of_range_names_value_and_bound(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "{}"), ["ray.num_cpus=0"])
    assert "ray.num_cpus = 0" in str(e.value) and ">= 1" in str(e.value)


def test_wrong_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "{}"), ["ray.auth_mode=password"])
    assert "'token'" in str(e.value) and "password" in str(e.value)


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "project:\n  seed: many\n"))
    assert "project.seed" in str(e.value) and "many" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "project: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="holds a value"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


def test_repo_pipelines_yaml_validates():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    load_config([root / "pipelines.yaml"])
    load_config([root / "pipelines.yaml", root / "configs" / "demo.yaml"])


def test_cli_reports_config_error_with_exit_2(tmp_path, capsys):
    p = write(tmp_path, "ray:\n  num_gpus: -1\n")
    assert main(["config", "--config", str(p)]) == 2
    assert "ray.num_gpus" in capsys.readouterr().err
    assert main(["config", "--config", str(p), "--set", "ray.num_gpus=1", "ray"]) == 0
    assert "num_gpus: 1" in capsys.readouterr().out
