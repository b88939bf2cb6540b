"""Count the reads of tensor values by the host (each one a wait for the device on a GPU), from any caller.

:class:`HostReads` is a context manager that sees every such read in the process while it is
active, whoever makes it (our code, torch's optimizer, DeepSpeed, transformers, diffusers):
a ``TorchDispatchMode`` for the aten ops whose result the host needs (``_local_scalar_dense``:
``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``; ``nonzero``, ``masked_select``,
``unique``, ... whose output size depends on the values) and a ``TorchFunctionMode`` for
``Tensor.tolist`` / ``Tensor.numpy`` / ``__array__``, which read memory without going
through the dispatcher. Each read is recorded with its source: the first frame outside
torch's dispatch machinery, as ``package/path.py:function``.

On a CPU every tensor is on the host, so a read costs nothing there; what is counted is what
would wait for the GPU if the tensor lived on it. ``bench/train_gpu.py`` counts the real waits
on a GPU with ``torch.cuda.set_sync_debug_mode("warn")``.

Hand-written on purpose: torch's own ``set_sync_debug_mode`` works on CUDA only, and the
tests must pin the number of reads per step on a CPU.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: aten ops whose result the host must see: a scalar read, or an output whose size depends on the values.
READ_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten.equal.default: "equal",
}
#: Tensor methods that read memory directly (no aten op).
READ_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.__array__: "__array__"}

_SKIP = (
    "torch/utils/_python_dispatch.py",
    "torch/_tensor.py",
    "torch/overrides.py",
    "torch/_ops.py",
    "torch/utils/_device.py",
    "torch/_refs/",
    "torch/_prims",
    "torch/_decomp/",
    "torch/_dynamo/",
    "torch/_compile.py",
    __file__.replace("\\", "/"),
)


#: Sources whose reads are of tensors that live on the host in a GPU run too: no wait for the device.
HOST_SOURCES = {
    # torch AdamW's per-parameter step counters are CPU tensors unless capturable/fused (DeepSpeed: not)
    "torch/optim/optimizer.py:_get_value": "AdamW's step counters (CPU tensors)",
}
_host = threading.local()


@contextmanager
def host_side():
    """Code that reads tensors which live on the host in a GPU run too (e.g. building the LLM's
    attention mask from the tokenizer's output): its reads are recorded as ``host ...``."""
    _host.depth = getattr(_host, "depth", 0) + 1
    try:
        yield
    finally:
        _host.depth -= 1


def device_reads(reads: Counter) -> int:
    """The reads of a :meth:`HostReads.take` that would wait for a GPU (not ``host ...``)."""
    return sum(n for k, n in reads.items() if not k.startswith("host "))


def _source(depth: int = 2) -> str:
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if not any(s in name for s in _SKIP):
            return f"{_short(name)}:{f.f_code.co_name}"
        f = f.f_back
    return "?"


def _short(path: str) -> str:
    """``.../site-packages/deepspeed/runtime/utils.py`` -> ``deepspeed/runtime/utils.py``; ours relative to the repo."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parents[1]).replace("\\", "/") + "/"
    return path.removeprefix(root)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostReads):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = READ_OPS.get(func)
        if what == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            what = None  # the output size given: no read
        if what is not None and self.owner.active:
            self.owner.record(what)
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner: HostReads):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = READ_METHODS.get(func)
        if what is not None and self.owner.active:
            self.owner.record(what)
        return func(*args, **(kwargs or {}))


class HostReads:
    """Every host read of a tensor value while :attr:`active` (``with HostReads() as r: ...``).

    ``reads``: a Counter of ``"<what> <source>"`` (``"host <what> <source>"`` for reads of
    tensors that stay on the host in a GPU run: :func:`host_side`, :data:`HOST_SOURCES`);
    :meth:`take` returns it and starts afresh (per step). :attr:`active` can be switched off around code that is not being measured."""

    def __init__(self):
        self.reads: Counter[str] = Counter()
        self.active = True
        self._modes = (_Function(self), _Dispatch(self))

    def record(self, what: str) -> None:
        self.active = False  # reading the stack runs no tensor code, but be sure nothing re-enters
        try:
            src = _source(3)
            host = getattr(_host, "depth", 0) > 0 or src in HOST_SOURCES
            self.reads[f"{'host ' if host else ''}{what} {src}"] += 1
        finally:
            self.active = True

    def take(self) -> Counter[str]:
        out, self.reads = self.reads, Counter()
        return out

    def __enter__(self) -> HostReads:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
