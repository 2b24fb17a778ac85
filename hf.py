"""
Hugging Face's layouts of CLIP (`openai/clip-vit-large-patch14`: config.json + *.safetensors) and
LLaMA (config.json + model*.safetensors, with or without an index), read under OpenAI's and Meta's
key names, lazily: a key maps to (file, original key, getter), as pneumollm's own readers do. Kept
apart so that pneumollm.py holds the loaders of the original checkpoints only.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from pneumollm import CheckpointError, Entry, LlamaArgs, VisionArgs


def _safetensors(files) -> dict:
    out = {}
    for file in files:
        f = safe_open(str(file), "pt")
        out.update({k: Entry(str(file), k, (lambda f=f, k=k: f.get_tensor(k))) for k in f.keys()})
    return out


_HF_CLIP = [  # Hugging Face name -> OpenAI name
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"), (r"mlp\.fc1\.", "mlp.c_fc."),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"), (r"mlp\.fc2\.", "mlp.c_proj."),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.", "visual.ln_pre."), (r"vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"vision_model\.encoder\.layers\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"self_attn\.out_proj\.", "attn.out_proj."), (r"layer_norm(\d)\.", r"ln_\1."),
]


def read_clip_hf(folder: Path) -> tuple[VisionArgs, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    c = cfg.get("vision_config", cfg)
    v = VisionArgs(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["patch_size"],
                   c["image_size"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files next to config.json")
    out, qkv = {}, {}
    for k, e in _safetensors(files).items():
        for pat, rep in _HF_CLIP:
            k = re.sub(pat, rep, k)
        m = re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:  # q, k, v are fused into nn.MultiheadAttention's in_proj, in that order
            qkv.setdefault(f"{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = e
        else:
            out[k] = e
    for k, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{parts[next(iter(parts))].file}: {k} lacks one of q/k/v_proj")
        out[k] = Entry(parts["q"].file, parts["q"].key, lambda p=parts: torch.cat([p[x].get() for x in "qkv"]))
    return v, out


_HF_LLAMA = [  # Hugging Face name -> Meta name
    (r"model\.embed_tokens\.", "tok_embeddings."), (r"model\.norm\.", "norm."), (r"lm_head\.", "output."),
    (r"model\.layers\.", "layers."), (r"self_attn\.([qkvo])_proj\.", r"attention.w\1."),
    (r"mlp\.gate_proj\.", "feed_forward.w1."), (r"mlp\.down_proj\.", "feed_forward.w2."),
    (r"mlp\.up_proj\.", "feed_forward.w3."),
    (r"input_layernorm\.", "attention_norm."), (r"post_attention_layernorm\.", "ffn_norm."),
]


def read_llama_hf(folder: Path) -> tuple[LlamaArgs, dict]:
    c = json.loads((folder / "config.json").read_text())
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{folder}/config.json: rope scaling {rope.get('rope_type')} is not supported")
    p = LlamaArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                  n_kv_heads=c.get("num_key_value_heads"), vocab_size=c.get("vocab_size", -1),
                  norm_eps=c.get("rms_norm_eps", 1e-6),
                  rope_theta=c.get("rope_theta", rope.get("rope_theta", 1e4)),
                  ffn_hidden=c["intermediate_size"], rope_halves=True)
    index = folder / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.exists():  # sharded: the index maps every key to its file
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for k, e in _safetensors([folder / n for n in names]).items():
        for pat, rep in _HF_LLAMA:
            k = re.sub(pat, rep, k)
        out[k] = e
    return p, out
