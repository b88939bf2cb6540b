from captioning.prep import slug
from paradiffusion.storage import _SHARD_RE


def test_slug_of_a_long_path_is_a_valid_shard_name():
    # a model folder under pytest's tmp path: the cut fell on an underscore
    path = "/tmp/pytest-of-root/pytest-7/test_demo_on_s3_runs_every_sta0/demo/models/tiny_vlm"
    for p in (path, "_x", "__init__", "/a/_b"):
        s = slug(p)
        assert _SHARD_RE.match(s + ".norev.12345678.paper--00000--cf81e4dcc6"), s
    assert slug("llava-hf/llava-1.5-7b-hf") == "llava-hf-llava-1.5-7b-hf"
