"""The fp32 master weights under DeepSpeed, and the EMA kept from them.

DeepSpeed trains the module's parameters in bf16 but updates fp32 *master* copies of the
trained ones and casts them back to bf16 after each optimizer step. Under ZeRO-1/2 each
rank holds a contiguous piece (a "fragment") of the flattened masters; under ZeRO-3 a piece
of every parameter; without ZeRO (stage 0) the whole set, replicated. The bf16 module
weights are a rounding of the masters: an EMA built from them, or an export written from
them, loses what bf16 cannot hold (an EMA update ``(1 - decay) * (w - ema)`` is far below
bf16's resolution near the weight, so a bf16 EMA stalls; see
``tests/training/test_precision.py::test_ema_of_bf16_training_moves_like_the_fp32_reference``).

So this module reads the masters where DeepSpeed keeps them, rank by rank:

- :func:`master_fragments` gives this rank's fp32 piece of every trained parameter;
- :class:`ShardedEMA` keeps an fp32 EMA of exactly those pieces (on the accelerator or in
  CPU memory), updated after each optimizer step without any communication: its memory is
  4 bytes x trained parameters / ranks (one more Adam moment), and it checkpoints per rank;
- :func:`gather_full` assembles whole fp32 tensors (of the masters or of the EMA) on rank 0
  for an export, one parameter at a time, with every rank taking part.

DeepSpeed's documented accessor ``deepspeed.utils.safe_get_full_fp32_param`` gathers one
whole parameter on every rank per call (an all-reduce); doing that per step for an EMA would
move all trained weights over the network every step. The per-rank pieces are read from
the same fields it reads (``param._hp_mapping`` for ZeRO-1/2 and DeepSpeed's bf16 optimizer,
the ZeRO-3 optimizer's ``fp32_partitioned_groups_flat`` at ``grad_position``), and the tests
check the gathered result against ``safe_get_full_fp32_param`` so a DeepSpeed change that
moves them fails there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from paradiffusion.log import get_logger

log = get_logger("training.ema")

#: EMA decay schedules (``train.stageN.ema.warmup``); k counts the updates after the first.
WARMUPS = ("ratio", "power", "none")


@dataclass
class Fragment:
    """This rank's fp32 piece of one trained parameter."""

    name: str  # the parameter's name in the model ("unet.conv_in.weight")
    shape: torch.Size  # the whole parameter's shape
    start: int  # offset of the piece in the flattened parameter
    master: torch.Tensor  # 1-D fp32 view of the master weights (``numel`` elements)

    @property
    def numel(self) -> int:
        return self.master.numel()


def trained_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trained parameter, in the module's order (the same on every rank)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _full_shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def master_fragments(engine) -> list[Fragment]:
    """This rank's fp32 master piece of every trained parameter of ``engine.module``.

    A parameter of which this rank holds nothing (ZeRO-1/2 cut the flat masters at rank
    boundaries) has no fragment here. The views are read fresh on each call (cheap): the
    trainer calls this after every optimizer step, so a DeepSpeed that swaps the flat
    tensors (a checkpoint load) is followed.
    """
    opt = engine.optimizer
    unfused = {}  # stage 0 + bf16: DeepSpeed's unfused optimizer keeps parallel fp16/fp32 groups
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups") and not hasattr(opt, "bit16_groups"):
        for lo, hi in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
            unfused.update({id(p): m for p, m in zip(lo, hi, strict=True)})
    out = []
    for name, p in trained_parameters(engine.module):
        if hasattr(p, "ds_id"):  # ZeRO-3: rank r holds elements [r * n, (r + 1) * n) of every parameter
            z3 = p._z3_optimizer
            group, offset, n = z3.grad_position[z3.get_param_id(p)]
            piece = z3.fp32_partitioned_groups_flat[group].narrow(0, offset, n)
            start = z3._get_param_partition_rank(p) * n
            valid = max(0, min(n, p.ds_numel - start))  # the last rank's piece is padded
            if valid:
                out.append(Fragment(name, _full_shape(p), start, piece[:valid]))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: a contiguous fragment, or none on this rank
            hm = p._hp_mapping
            if hm is not None:
                frag = hm.get_hp_fragment().view(-1)
                out.append(Fragment(name, p.shape, hm.lp_fragment_address.start, frag))
        elif id(p) in unfused:
            out.append(Fragment(name, p.shape, 0, unfused[id(p)].detach().view(-1)))
        elif p.dtype == torch.float32:  # fp32 training without a DeepSpeed wrapper: the parameter is the master
            out.append(Fragment(name, p.shape, 0, p.detach().view(-1)))
        else:
            raise RuntimeError(
                f"{name}: no fp32 master weights found for a {p.dtype} parameter under this DeepSpeed "
                f"configuration ({type(opt).__name__}); use train.deepspeed.zero_stage 1, 2 or 3"
            )
    return out


def gather_full(
    engine, pieces: dict[str, tuple[int, torch.Tensor]], partitioned: bool, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """Whole fp32 tensors (on CPU) of every trained parameter on rank 0, from each rank's pieces.

    ``pieces``: ``name -> (start, 1-D tensor)`` of this rank. Every rank must call this (an
    all-reduce per parameter when ``partitioned``); ranks other than 0 get None. One
    parameter's buffer is on ``device`` at a time.
    """
    import deepspeed.comm as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for name, p in trained_parameters(engine.module):
        shape = _full_shape(p)
        buf = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
        if name in pieces:
            start, piece = pieces[name]
            buf[start : start + piece.numel()] = piece.to(device, torch.float32)
        if partitioned and world > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if rank == 0:
            out[name] = buf.view(shape).cpu()
    return out if rank == 0 else None


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether the masters are split across ranks (decided alike on every rank, even one holding no piece)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in trained_parameters(module))


def master_weights(engine, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of every trained parameter, whole, on rank 0 (collective)."""
    pieces = {f.name: (f.start, f.master) for f in master_fragments(engine)}
    return gather_full(engine, pieces, is_partitioned(engine.module), device)


class ShardedEMA:
    """An fp32 exponential moving average of this rank's pieces of the master weights.

    ``decay_at(n)`` is the decay of the n-th update, as diffusers' ``EMAModel``: the first
    update copies the weights; then with ``k = n - 1`` it is ``min(decay, (1 + k) / (10 + k))``
    for ``warmup="ratio"`` (EMAModel's default), ``min(decay, 1 - (1 + k / inv_gamma) ** -power)``
    for ``"power"`` (EMAModel's ``use_ema_warmup``), or ``decay`` for ``"none"``.
    """

    def __init__(
        self,
        fragments: list[Fragment],
        decay: float = 0.9999,
        warmup: str = "ratio",
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        device: torch.device | str = "cpu",
    ):
        if warmup not in WARMUPS:
            raise ValueError(f"warmup={warmup!r}: one of {WARMUPS}")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.device = torch.device(device)
        self.reset(fragments)

    def reset(self, fragments: list[Fragment]) -> None:
        """Start over from the given masters (update count 0)."""
        self.updates = 0
        self.starts = {f.name: f.start for f in fragments}
        self.values = {f.name: f.master.detach().to(self.device, torch.float32, copy=True) for f in fragments}

    def decay_at(self, n: int) -> float:
        k = n - 1
        if k <= 0:
            return 0.0
        if self.warmup == "ratio":
            d = (1 + k) / (10 + k)
        elif self.warmup == "power":
            d = 1 - (1 + k / self.inv_gamma) ** -self.power
        else:
            d = self.decay
        return min(d, self.decay)

    @torch.no_grad()
    def update(self, fragments: list[Fragment]) -> float:
        """One EMA step toward the current masters (call after each optimizer step); returns the decay."""
        self.updates += 1
        d = self.decay_at(self.updates)
        emas, masters = [], []
        for f in fragments:
            if self.starts.get(f.name) != f.start or self.values[f.name].numel() != f.numel:
                raise RuntimeError(f"EMA layout changed for {f.name}: the master fragments moved between ranks")
            emas.append(self.values[f.name])
            masters.append(f.master if f.master.device == self.device else f.master.to(self.device, non_blocking=True))
        if len(emas) != len(self.values):
            raise RuntimeError(f"EMA holds {len(self.values)} fragments, the optimizer {len(emas)}")
        if emas:
            torch._foreach_lerp_(emas, masters, 1.0 - d)  # ema += (1 - d) * (master - ema), in fp32
        return d

    def pieces(self) -> dict[str, tuple[int, torch.Tensor]]:
        return {n: (self.starts[n], v) for n, v in self.values.items()}

    def full(self, engine, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The whole fp32 EMA of every trained parameter on rank 0 (collective)."""
        return gather_full(engine, self.pieces(), is_partitioned(engine.module), device)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's pieces (CPU tensors) with where they sit in each parameter."""
        return {
            "updates": self.updates,
            "fragments": {n: {"start": self.starts[n], "value": v.detach().cpu()} for n, v in self.values.items()},
        }

    def load(self, files: list[Path], own: Path | None) -> None:
        """Fill this rank's pieces from EMA files written by one or more ranks.

        ``own``, when given, is read first (same world size: it holds exactly this rank's
        pieces); the others only for what is still missing (a different world size), each
        memory-mapped so only the overlapping slices are read.
        """
        need = {n: torch.zeros(v.numel(), dtype=torch.bool) for n, v in self.values.items()}
        updates = None
        order = ([own] if own is not None else []) + [f for f in files if f != own]
        for path in order:
            if all(bool(m.all()) for m in need.values()):
                break
            st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            updates = st["updates"] if updates is None else updates
            for name, frag in st["fragments"].items():
                if name not in self.values:
                    continue
                lo_s, saved = frag["start"], frag["value"]
                mine, start = self.values[name], self.starts[name]
                lo, hi = max(start, lo_s), min(start + mine.numel(), lo_s + saved.numel())
                if lo < hi:
                    mine[lo - start : hi - start] = saved[lo - lo_s : hi - lo_s].to(mine.device)
                    need[name][lo - start : hi - start] = True
        missing = [n for n, m in need.items() if not bool(m.all())]
        if missing:
            raise RuntimeError(f"EMA checkpoint {order[0].parent if order else '?'} lacks {missing[:3]}...")
        self.updates = int(updates or 0)
