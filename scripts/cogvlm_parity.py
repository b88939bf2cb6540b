"""Record what the reference CogVLM / CogVLM2 code computes on tiny random models (the parity fixtures).

This is the *reference side* of the parity test in ``tests/captioning/test_cogvlm_parity.py``.
It runs in an isolated environment with the transformers version the reference code was
written for (4.42.x; the CogVLM2 remote code branches on ``transformers >= 4.42``), imports
the reference modelling code from folders you pass, builds a tiny random CogVLM (v1) and a
tiny random CogVLM2 with it, saves them with ``save_pretrained`` and records, on fixed
inputs (3 images, prompts of different lengths):

- the inputs the reference builds (``build_conversation_input_ids``): ids, token types, pixels;
- fp32 logits of every row alone and of the left-padded batch;
- greedy tokens (32 new) of every row alone and of the left-padded batch;
- the batch again with the saved folder loaded in bf16 (logits, greedy tokens);
- the reference's prompt templates rendered for one query.

Nothing here is imported by the toolkit; CI only reads the fixture folders it wrote. The
reference code is never copied into this repository: you fetch it yourself and pass its
location. Reference sources (see ``tests/captioning/data/cogvlm_parity/README.md``):

- CogVLM2: the ``THUDM/cogvlm2-llama3-chat-19B`` Hub remote code (``modeling_cogvlm.py``,
  ``configuration_cogvlm.py``, ``visual.py``, ``util.py``) from a public GitHub copy.
- CogVLM v1: no verbatim public copy of the ``THUDM/cogvlm-chat-hf`` remote code was found.
  Its language model is the one of the CogAgent Hub remote code (``modeling_cogagent.py``,
  same authors, same family): ``VisionExpertAttention`` with full multi-head attention, no
  bias, ``RotaryEmbedding`` with base 10000, ``build_position_ids`` and the expert masks.
  The v1 reference model is the CogVLM2 reference model with that attention class swapped
  in and the 2x2 ``conv`` of the CogVLM2 vision tower taken out (v1's ``visual.py`` has
  none), which is how the two Hub files differ.

Substitutions made here, and only here (the reference needs a GPU or a real-size vocab):
``xformers.ops.memory_efficient_attention`` -> ``torch.nn.functional.scaled_dot_product_attention``;
the triton rotary kernel of ``util.py`` -> the same rotation in plain torch; an embedding
``padding_idx`` beyond the tiny vocab (CogVLM2 hard-codes 128002) is dropped (it only changes
initialisation, and every weight is re-drawn below); CogVLM2's ``build_conversation_input_ids``
sets ``tokenizer.pad_token_id = 128002`` for its image slots, which the tiny vocab does not
have, so the tokenizer passed to it keeps its own pad id (the slots are overwritten by image
features, so the id never reaches the model).

Usage (in the reference environment)::

    python scripts/cogvlm_parity.py --cogvlm2-ref /path/to/cogvlm2 \\
        --cogagent-ref /path/to/modeling_cogagent.py --out tests/captioning/data/cogvlm_parity
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Prompts of different lengths (words of the tiny tokenizer's vocabulary, plus a few it lacks).
PROMPTS = [
    "describe the image",
    "provide a detailed description of the image using around words including the objects attributes "
    "and spatial locations depicted in the picture",
    "what is in this picture",
]
NEW_TOKENS = 32
TEMPLATE_QUERY = "describe the image"


def _skip(msg: str) -> None:
    print(f"skipped: {msg}")
    raise SystemExit(0)


def _stub_xformers() -> None:
    """xformers' memory_efficient_attention (B, L, H, D in and out) in plain torch."""
    import torch

    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert attn_bias is None and p == 0.0
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2).contiguous()

    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    sys.modules.setdefault("xformers", pkg)
    sys.modules.setdefault("xformers.ops", ops)


def _plain_rotary(x, cos, sin, interleaved=False, inplace=False, **_):
    """The non-interleaved rotation util.py's triton kernel applies; x: (B, H, L, D), cos/sin: (B, L, D/2)."""
    import torch

    assert not interleaved
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x0, x1 = x[..., :half], x[..., half : 2 * half]
    out = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos, x[..., 2 * half :]], dim=-1)
    if inplace:
        x.copy_(out)
        return x
    return out


def _package(name: str, folder: Path) -> types.ModuleType:
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg
    return pkg


def load_reference(cogvlm2_dir: Path, cogagent_file: Path):
    """Import the CogVLM2 reference package and the CogAgent reference module (with stubs for its siblings)."""
    from transformers import PretrainedConfig

    _stub_xformers()
    _package("cogvlm2_reference", cogvlm2_dir)
    util = importlib.import_module("cogvlm2_reference.util")
    util.apply_rotary_emb_func = _plain_rotary
    util.apply_rotary_emb = _plain_rotary
    m2 = importlib.import_module("cogvlm2_reference.modeling_cogvlm")
    conf2 = importlib.import_module("cogvlm2_reference.configuration_cogvlm")
    visual = importlib.import_module("cogvlm2_reference.visual")

    # CogAgent's siblings (configuration, its two vision towers) are not needed for the classes we use.
    _package("cogagent_reference", cogagent_file.parent)
    stub_conf = types.ModuleType("cogagent_reference.configuration_cogagent")
    stub_conf.CogAgentConfig = type("CogAgentConfig", (PretrainedConfig,), {})
    stub_vis = types.ModuleType("cogagent_reference.visual")
    stub_vis.EVA2CLIPModel = visual.EVA2CLIPModel
    stub_cross = types.ModuleType("cogagent_reference.cross_visual")
    stub_cross.CrossVisionModel = object
    for m in (stub_conf, stub_vis, stub_cross):
        sys.modules[m.__name__] = m
    spec = importlib.util.spec_from_file_location("cogagent_reference.modeling_cogagent", cogagent_file)
    agent = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = agent
    spec.loader.exec_module(agent)
    return m2, conf2, visual, agent


class _KeepPad:
    """A tokenizer view whose ``pad_token_id`` cannot be overwritten (CogVLM2 sets 128002 for its image slots)."""

    def __init__(self, tok):
        object.__setattr__(self, "_tok", tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        if name != "pad_token_id":
            setattr(self._tok, name, value)


def _embedding_padding_guard():
    """nn.Embedding without a padding_idx that lies outside a tiny vocab (it only affects initialisation)."""
    import torch

    orig = torch.nn.Embedding.__init__

    def init(self, num_embeddings, embedding_dim, padding_idx=None, *a, **k):
        if padding_idx is not None and not (-num_embeddings <= padding_idx < num_embeddings):
            padding_idx = None
        orig(self, num_embeddings, embedding_dim, padding_idx, *a, **k)

    torch.nn.Embedding.__init__ = init
    return lambda: setattr(torch.nn.Embedding, "__init__", orig)


def randomize(model, seed: int) -> None:
    """Re-draw every parameter so logits are spread out (the reference init, std 0.02, gives near-ties)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("norm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.numel() // p.shape[0] if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, fan_in)))


def fixture_images():
    """Three small RGB images of different sizes and content (saved as PNG with the fixture)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:48, 0:32]
    b = np.stack([xx * 8 % 256, yy * 5 % 256, (xx + yy) * 3 % 256], -1).astype(np.uint8)
    c = np.full((30, 30, 3), (200, 40, 90), np.uint8)
    c[5:20, 8:25] = (20, 180, 60)
    return [Image.fromarray(x) for x in (a, b, c)]


def v1_inputs(tokenizer, config, history_to_prompt, image, query: str, template: str) -> dict:
    """CogVLM v1's build_conversation_input_ids (CogAgent's, without its high-resolution cross image)."""
    import torch
    from torchvision import transforms

    image_size = config.vision_config["image_size"]
    patch_size = config.vision_config["patch_size"]
    text = history_to_prompt(template, [], query)
    input_ids, token_type_ids = [tokenizer.bos_token_id], [0]
    transform = transforms.Compose(
        [
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    images = [transform(image)]
    n_vision = (image_size // patch_size) * (image_size // patch_size) + 2
    input_ids += [tokenizer.pad_token_id] * n_vision
    token_type_ids += [1] * n_vision
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    input_ids += text_ids
    token_type_ids += [0] * len(text_ids)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "images": images,
    }


def left_pad(rows: list[dict], pad_id: int) -> dict:
    import torch

    width = max(int(r["input_ids"].shape[0]) for r in rows)

    def pad(t, value):
        return torch.nn.functional.pad(t, (width - t.shape[0], 0), value=value)

    return {
        "input_ids": torch.stack([pad(r["input_ids"], pad_id) for r in rows]),
        "token_type_ids": torch.stack([pad(r["token_type_ids"], 0) for r in rows]),
        "attention_mask": torch.stack([pad(r["attention_mask"], 0) for r in rows]),
        "images": [[r["images"][0]] for r in rows],
    }


def record(model, tokenizer, rows: list[dict], out: Path, extra: dict, bf16_model=None) -> dict:
    """Run the reference on each row alone and on the left-padded batch; save tensors and a summary.

    ``bf16_model`` (the saved folder loaded back with ``torch_dtype=torch.bfloat16``, as users
    load the real checkpoints) adds the batch's bf16 logits and greedy tokens.
    """
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    pad_id = tokenizer.pad_token_id
    summary: dict = {"rows": []}
    with torch.no_grad():
        for i, r in enumerate(rows):
            one = left_pad([r], pad_id)
            logits = model(**one).logits[0]
            gen = model.generate(**one, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
            new = gen[0, one["input_ids"].shape[1] :]
            tensors.update(
                {
                    f"row{i}.input_ids": r["input_ids"],
                    f"row{i}.token_type_ids": r["token_type_ids"],
                    f"row{i}.pixel_values": r["images"][0].contiguous(),
                    f"row{i}.logits": logits.float().contiguous(),
                    f"row{i}.greedy": new.contiguous(),
                }
            )
            summary["rows"].append({"length": int(r["input_ids"].shape[0]), "greedy": new.tolist()})
        batch = left_pad(rows, pad_id)
        logits = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
        new = gen[:, batch["input_ids"].shape[1] :]
        tensors.update(
            {
                "batch.input_ids": batch["input_ids"],
                "batch.token_type_ids": batch["token_type_ids"],
                "batch.attention_mask": batch["attention_mask"],
                "batch.logits": logits.float().contiguous(),
                "batch.greedy": new.contiguous(),
            }
        )
        if bf16_model is not None:
            b16 = dict(batch, images=[[im.to(torch.bfloat16) for im in ims] for ims in batch["images"]])
            tensors["batch.logits_bf16"] = bf16_model(**b16).logits.float().contiguous()
            gen = bf16_model.generate(**b16, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
            tensors["batch.greedy_bf16"] = gen[:, batch["input_ids"].shape[1] :].contiguous()
            summary["batch_greedy_bf16"] = tensors["batch.greedy_bf16"].tolist()
    summary["batch_greedy"] = new.tolist()
    summary["padded_equals_alone"] = [
        summary["batch_greedy"][i] == summary["rows"][i]["greedy"] for i in range(len(rows))
    ]
    save_file(tensors, str(out / "reference_outputs.safetensors"))
    summary.update(extra)
    (out / "reference_outputs.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def save_model(model, config, out: Path, auto_map: dict, shard: str | None) -> None:
    """save_pretrained without copying the reference code into the folder (auto_map kept as on the Hub)."""
    type(config)._auto_class = None
    type(model)._auto_class = None
    kw = {"safe_serialization": True}
    if shard:
        kw["max_shard_size"] = shard
    model.save_pretrained(str(out), **kw)
    for py in out.glob("*.py"):
        py.unlink()
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = auto_map
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cogvlm2-ref", type=Path, help="folder with the CogVLM2 Hub remote code")
    ap.add_argument("--cogagent-ref", type=Path, help="the CogAgent Hub remote code's modeling_cogagent.py")
    ap.add_argument("--out", type=Path, default=REPO / "tests/captioning/data/cogvlm_parity")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.cogvlm2_ref or not (args.cogvlm2_ref / "modeling_cogvlm.py").is_file():
        _skip("pass --cogvlm2-ref: a folder with the CogVLM2 remote code (modeling_cogvlm.py, visual.py, ...)")
    if not args.cogagent_ref or not args.cogagent_ref.is_file():
        _skip("pass --cogagent-ref: the CogAgent remote code's modeling_cogagent.py")

    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    from paradiffusion.testing.tiny_vlm import build_tokenizer

    torch.manual_seed(args.seed)
    m2, conf2, visual, agent = load_reference(args.cogvlm2_ref, args.cogagent_ref)
    tokenizer = build_tokenizer()
    images = fixture_images()
    auto_map = {
        "AutoConfig": "configuration_cogvlm.CogVLMConfig",
        "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
    }
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    env = {"transformers": transformers.__version__, "torch": torch.__version__}
    restore = _embedding_padding_guard()
    try:
        # ---- CogVLM2 (cogvlm2-llama3-chat-19B architecture, tiny) ----
        out2 = args.out / "cogvlm2"
        out2.mkdir(parents=True, exist_ok=True)
        cfg2 = conf2.CogVLMConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_multi_query_heads=2,
            max_position_embeddings=256,
            template_version="chat",
            vision_config={
                "dropout_prob": 0.0,
                "hidden_act": "gelu",
                "in_channels": 3,
                "num_hidden_layers": 2,
                "hidden_size": 24,
                "patch_size": 4,
                "num_heads": 2,
                "intermediate_size": 48,
                "layer_norm_eps": 1e-6,
                "num_positions": (32 // 4) ** 2 + 1,
                "image_size": 32,
            },
            **ids,
        )
        model2 = m2.CogVLMForCausalLM(cfg2).eval()
        randomize(model2, args.seed + 2)
        keep = _KeepPad(tokenizer)
        rows2 = [
            model2.build_conversation_input_ids(keep, query=q, history=[], images=[im], template_version="chat")
            for im, q in zip(images, PROMPTS, strict=True)
        ]
        save_model(model2, cfg2, out2, auto_map, shard=None)
        bf16 = m2.CogVLMForCausalLM.from_pretrained(str(out2), torch_dtype=torch.bfloat16).eval()
        s2 = record(model2, tokenizer, rows2, out2, {"env": env, "template": "chat", "prompts": PROMPTS}, bf16)
        print("cogvlm2:", json.dumps(s2["padded_equals_alone"]))

        # ---- CogVLM v1 (cogvlm-chat-hf architecture, tiny) ----
        class CogVLMConfig(transformers.PretrainedConfig):
            """The v1 config fields (cogvlm-chat-hf's config.json): no num_multi_query_heads."""

            def __init__(self, **kw):
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "hidden_act",
                    "max_position_embeddings",
                    "initializer_range",
                    "rms_norm_eps",
                    "template_version",
                    "use_cache",
                    "vision_config",
                    "vocab_size",
                ):
                    if k in kw:
                        setattr(self, k, kw.pop(k))
                super().__init__(**kw)

        class V1Vision(visual.EVA2CLIPModel):
            """v1's EVA2-CLIP tower: the CogVLM2 one without the 2x2 conv downsampling."""

            def __init__(self, config):
                super().__init__(config)
                del self.conv

            def forward(self, images):
                x = self.patch_embedding(images)
                x = self.transformer(x)
                x = x[:, 1:]
                x = self.linear_proj(x)
                boi = self.boi.expand(x.shape[0], -1, -1)
                eoi = self.eoi.expand(x.shape[0], -1, -1)
                return torch.cat((boi, x, eoi), dim=1)

        out1 = args.out / "cogvlm"
        out1.mkdir(parents=True, exist_ok=True)
        cfg1 = CogVLMConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="silu",
            max_position_embeddings=256,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
            template_version="chat",
            use_cache=True,
            tie_word_embeddings=False,
            vision_config={
                "dropout_prob": 0.0,
                "hidden_act": "gelu",
                "in_channels": 3,
                "num_hidden_layers": 2,
                "hidden_size": 24,
                "patch_size": 4,
                "num_heads": 2,
                "intermediate_size": 48,
                "layer_norm_eps": 1e-6,
                "num_positions": (24 // 4) ** 2 + 1,
                "image_size": 24,
            },
            **ids,
        )
        saved = (m2.VisionExpertAttention, m2.EVA2CLIPModel)
        m2.VisionExpertAttention, m2.EVA2CLIPModel = agent.VisionExpertAttention, V1Vision
        try:
            model1 = m2.CogVLMForCausalLM(cfg1).eval()
            randomize(model1, args.seed + 1)
            save_model(model1, cfg1, out1, auto_map, shard="40KB")
            bf16 = m2.CogVLMForCausalLM.from_pretrained(
                str(out1), config=CogVLMConfig.from_pretrained(str(out1)), torch_dtype=torch.bfloat16
            ).eval()
        finally:
            m2.VisionExpertAttention, m2.EVA2CLIPModel = saved
        rows1 = [
            v1_inputs(tokenizer, cfg1, m2._history_to_prompt, im, q, "chat")
            for im, q in zip(images, PROMPTS, strict=True)
        ]
        s1 = record(model1, tokenizer, rows1, out1, {"env": env, "template": "chat", "prompts": PROMPTS}, bf16)
        print("cogvlm:", json.dumps(s1["padded_equals_alone"]))
    finally:
        restore()

    # ---- the fixture images, the tokenizer and the reference templates ----
    for i, im in enumerate(images):
        im.save(args.out / f"image{i}.png")
    tokenizer.save_pretrained(str(args.out / "tokenizer"))
    templates = {
        "hub (CogVLM2, CogVLM v1)": {t: m2._history_to_prompt(t, [], TEMPLATE_QUERY) for t in ("base", "chat", "vqa")},
        "hub with history": {
            t: m2._history_to_prompt(t, [("q1", "a1")], TEMPLATE_QUERY) for t in ("base", "chat", "vqa")
        },
        "cogagent (chat_old)": agent.chat_old_history_to_prompt([], TEMPLATE_QUERY),
        "query": TEMPLATE_QUERY,
    }
    (args.out / "templates.json").write_text(json.dumps(templates, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
