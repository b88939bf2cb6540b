"""How far our bf16 CogVLM logits are from the reference's bf16 logits, per CPU kernel set and thread count.

Bit-identical bf16 on CPU depends on which kernels torch dispatches to (plain C++, AVX2,
AVX-512, AVX-512 BF16 / AMX) and on how a reduction is split over threads. This script
loads the parity fixtures (``tests/captioning/data/cogvlm_parity``) in bf16 and prints the
largest |logit difference| against the reference's bf16 logits, for every
``ATEN_CPU_CAPABILITY`` this processor supports and for 1 and 2 threads, each in a fresh
process (torch reads the variable once, at import). The tolerance of
``tests/captioning/test_cogvlm_parity.py::test_bf16_matches_the_reference_in_bf16`` comes
from these numbers (see its docstring for the table).

Usage::

    python scripts/cogvlm_bf16_spread.py            # every supported capability x 1, 2 threads
    python scripts/cogvlm_bf16_spread.py --one      # one measurement in this process (what the loop runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "captioning" / "data" / "cogvlm_parity"
CAPABILITIES = ("default", "avx2", "avx512")


def measure() -> dict:
    """{family: {impl: max |logit diff|}} in this process (its capability and thread count)."""
    import torch
    from safetensors.torch import load_file

    from captioning.cogvlm.loading import load_model

    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for family in ("cogvlm", "cogvlm2"):
        ref = load_file(str(DATA / family / "reference_outputs.safetensors"))
        batch = {k: ref[f"batch.{k}"] for k in ("input_ids", "token_type_ids", "attention_mask")}
        batch["pixel_values"] = torch.stack([ref[f"row{i}.pixel_values"] for i in range(3)]).to(torch.bfloat16)
        real = batch["attention_mask"].bool()
        for impl in ("eager", "sdpa"):
            model = load_model(str(DATA / family), dtype=torch.bfloat16, attn_implementation=impl)
            with torch.no_grad():
                logits = model(**batch).logits
            out[f"{family}/{impl}"] = (logits - ref["batch.logits_bf16"])[real].abs().max().item()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help="measure once in this process and print JSON")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return 0
    rows = []
    for cap in CAPABILITIES:
        for threads in (1, 2):
            env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads)}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
            r = subprocess.run(
                [sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=False
            )
            if r.returncode != 0:
                print(f"{cap} x {threads}: failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            got = json.loads(r.stdout.strip().splitlines()[-1])
            if got["capability"].lower() != cap and cap != "default":
                print(f"{cap}: not supported here (torch used {got['capability']})", file=sys.stderr)
                continue
            rows.append((cap, threads, got))
            print(f"{cap:8} threads={threads}: " + ", ".join(f"{k} {v:.3g}" for k, v in got.items() if "/" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
