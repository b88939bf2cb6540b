"""GPU benchmark: our captioners beside plain ``generate`` on 7B/17B-class VLMs, same run.

``--arch cogvlm``: the CogVLM-17B architecture (cogvlm-chat-hf's config: EVA2-CLIP-E at 490
px, 1,227 image tokens, Vicuna-7B with visual experts), our native implementation with
random bf16 weights. For each batch size it times ``plain`` (``model.generate`` on
preprocessed tensors, dynamic cache, eager: nothing compiled), ``plain_static`` (the same
with ``cache_implementation="static"``: transformers compiles the decode step), and our
``CogVLMCaptioner`` from PIL images with ``cache: dynamic`` (``ours``) and ``cache: static``
(``ours_static``); captions/s and peak GPU memory for each.

``--arch llava`` (the default):

The model is the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-2-7B) with random
weights in bf16, built from its config (no download). Every caption is forced to
``--new-tokens`` new tokens (200 by default) so all settings do the same work. For each
batch size (1, 16, 64 by default) it times:

- ``plain``: ``model.generate`` on pre-processed tensors (the plain
  baseline: 0.17 / 2.45 / 9.19 captions/s at batch 1 / 16 / 64 on one H200);
- ``ours``: :class:`captioning.captioners.TransformersCaptioner` from PIL images
  (chat template, processor, batched generate, decode, finish reasons);
- ``ours_static`` (``--static``): the same with ``cache: static`` (pre-allocated KV
  cache; transformers compiles the decode step), the first lever toward the goal.

Results go to ``$OUT/caption_gpu.json`` (default: bench_out/) as they come.
``--tiny --device cpu`` runs the same code on a tiny config as a check.

Usage: python bench/caption_gpu.py [--arch llava|cogvlm] [--tiny] [--device cuda|cpu] [--batches 1,16,64] [--static]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = (
    "Provide a detailed description of the image using around 100-500 words, including the objects, "
    "attributes, and spatial locations depicted in the picture."
)


def build(tiny: bool, device: str):
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from paradiffusion.testing.tiny_vlm import CHAT_TEMPLATE, build_tokenizer

    if tiny:
        tc = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32064,
        )
        vc = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
    else:  # LLaVA-1.5-7B
        tc = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        )
        vc = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
    tok = build_tokenizer(vocab_size=tc["vocab_size"])
    size = vc["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=vc["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vc),
        text_config=LlamaConfig(
            **tc, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def build_cogvlm(tiny: bool, device: str):
    """The CogVLM-17B architecture (or a tiny one) with random weights, and a word-level tokenizer of its vocab size."""
    import torch

    from captioning.cogvlm.configuration import CogVLMConfig
    from captioning.cogvlm.modeling import CogVLMForCausalLM
    from paradiffusion.testing.tiny_cogvlm import tiny_config
    from paradiffusion.testing.tiny_vlm import build_tokenizer

    vocab = 512 if tiny else 32000
    tok = build_tokenizer(vocab_size=vocab)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = tiny_config("cogvlm", vocab_size=vocab, **ids) if tiny else CogVLMConfig(**ids)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = CogVLMForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def run_cogvlm(a, device: str, batches: list[int], new_tokens: int, emit, sync) -> None:
    """plain / plain_static generate and our CogVLMCaptioner (dynamic / static cache) at each batch size."""
    import numpy as np
    import torch
    from PIL import Image

    from captioning.captioners import CogVLMCaptioner
    from captioning.cogvlm.processing import CogVLMProcessor
    from captioning.config import CaptionerSpec, GenerationSettings

    model, tok = build_cogvlm(a.tiny, device)
    emit(
        "model",
        arch="cogvlm-chat-hf" if not a.tiny else "tiny cogvlm",
        params=sum(p.numel() for p in model.parameters()),
    )
    rng = np.random.default_rng(0)
    gen = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    proc = CogVLMProcessor(tok, model.config, "chat")

    def timed(name: str, bs: int, fn, check) -> None:
        try:
            fn()  # warm-up (and compile, for static)
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = time.perf_counter() - t0
            check(out)
            mem = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None
            emit(f"{name}_bs{bs}", captions_per_s=round(bs / dt, 3), s_per_batch=round(dt, 2), peak_gib=mem)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next setting
            emit(f"{name}_bs{bs}_error", error=repr(exc)[:500], tb=traceback.format_exc()[-1500:])

    for bs in batches:
        images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)) for _ in range(bs)]
        if "plain" in a.parts:
            batch = {k: v.to(device) for k, v in proc(images, PROMPT).items()}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            width = batch["input_ids"].shape[1]
            for name, extra in (("plain", {}), ("plain_static", {"cache_implementation": "static"})):
                if name == "plain_static" and not a.static:
                    continue

                def plain(extra=extra, batch=batch):
                    with torch.inference_mode():
                        return model.generate(
                            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra
                        )

                timed(name, bs, plain, lambda out, width=width: _check_len(out.shape[1] - width, new_tokens))
        if "ours" in a.parts:
            for name, cache in (("ours", "dynamic"), ("ours_static", "static")):
                if name == "ours_static" and not a.static:
                    continue
                spec = CaptionerSpec(type="cogvlm", model="cogvlm-chat-hf-config-random", cache=cache)
                cap = CogVLMCaptioner.from_objects(model, tok, spec, gen)

                def ours(cap=cap, images=images):
                    return cap.caption(images, PROMPT)

                timed(
                    name,
                    bs,
                    ours,
                    lambda res: _check_len(min(r.n_tokens for r in res if r.error is None), new_tokens, res),
                )
        if device == "cuda":
            torch.cuda.empty_cache()


def _check_len(got: int, want: int, detail=None) -> None:
    if got != want:
        raise AssertionError(f"{got} new tokens, expected {want}: {str(detail)[:300]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config (a CPU check of the script)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--batches", default=None, help="default 1,16,64 (tiny: 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 200 (tiny: 8)")
    p.add_argument("--static", action="store_true", help="also time cache: static (compiled decode step)")
    p.add_argument("--parts", default="plain,ours", help="comma list of plain, ours")
    p.add_argument(
        "--arch", default="llava", choices=["llava", "cogvlm"], help="llava: LLaVA-1.5-7B; cogvlm: CogVLM-17B"
    )
    a = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from captioning.captioners import TransformersCaptioner
    from captioning.config import CaptionerSpec, GenerationSettings

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in (a.batches or ("1,4" if a.tiny else "1,16,64")).split(",")]
    new_tokens = a.new_tokens or (8 if a.tiny else 200)
    out_file = Path(os.environ.get("OUT") or "bench_out") / "caption_gpu.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "new_tokens": new_tokens,
        "tiny": a.tiny,
    }

    def emit(name: str, **kw) -> None:
        results[name] = kw
        print(json.dumps({name: kw}), flush=True)
        out_file.write_text(json.dumps(results, indent=1))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if a.arch == "cogvlm":
        out_file = out_file.with_name("caption_gpu_cogvlm.json")
        results["arch"] = "cogvlm"
        run_cogvlm(a, device, batches, new_tokens, emit, sync)
        print(json.dumps(results))
        return
    model, processor = build(a.tiny, device)
    rng = np.random.default_rng(0)
    gen = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    variants = {}
    if "ours" in a.parts:
        variants["ours"] = "dynamic"
        if a.static:
            variants["ours_static"] = "static"
    for bs in batches:
        images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)) for _ in range(bs)]
        if "plain" in a.parts:
            try:
                text = processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                inputs = processor(images=images, text=[text] * bs, return_tensors="pt", padding=True).to(device)
                inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)

                def plain(inputs=inputs):
                    with torch.inference_mode():
                        return model.generate(
                            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                        )

                plain()
                sync()
                t0 = time.perf_counter()
                out = plain()
                sync()
                dt = time.perf_counter() - t0
                assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
                emit(f"plain_bs{bs}", captions_per_s=round(bs / dt, 2), s_per_batch=round(dt, 2))
            except Exception as exc:  # noqa: BLE001 - record and go on to the next setting
                emit(f"plain_bs{bs}_error", error=repr(exc)[:500], tb=traceback.format_exc()[-1500:])
        for name, cache in variants.items():
            try:
                spec = CaptionerSpec(model="llava-1.5-7b-config-random", dtype="bfloat16", cache=cache)
                cap = TransformersCaptioner.from_objects(model, processor, spec, gen)
                cap.caption(images, PROMPT)  # warm-up (and compile, for static)
                sync()
                t0 = time.perf_counter()
                res = cap.caption(images, PROMPT)
                sync()
                dt = time.perf_counter() - t0
                assert all(r.n_tokens == new_tokens and r.error is None for r in res), res[:2]
                emit(
                    f"{name}_bs{bs}",
                    captions_per_s=round(bs / dt, 2),
                    s_per_batch=round(dt, 2),
                    includes="chat template, image preprocessing, generate, decode",
                )
            except Exception as exc:  # noqa: BLE001
                emit(f"{name}_bs{bs}_error", error=repr(exc)[:500], tb=traceback.format_exc()[-1500:])
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
