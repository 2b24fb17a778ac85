"""
PneumoLLM, the model and its loaders (Song et al., "PneumoLLM: Harnessing the Power of Large
Language Model for Pneumoconiosis Diagnosis", Medical Image Analysis 2024): a frozen CLIP ViT and a
frozen LLaMA, tuned with tiny RepAdapters, that classify chest radiographs.

    image -> CLIP ViT (adapter before every attention) -> raw CLS token after every 4th block
          -> multi-token engine (K diagnosis tokens, Eq. 1) -> projection MLP -> LLaMA blocks
          (adapter before every attention, emitter mask, Eq. 2) -> RMSNorm -> token mean -> head

Module paths equal OpenAI's / Meta's checkpoint keys; the loaders, after the model, read OpenAI's or
Hugging Face's CLIP and Meta's or Hugging Face's LLaMA as published, never running code from a file.
The model's ablations (Tables 4-6, Fig. 6) are PneumoArgs fields; the recipe's (the authors' ImageNet
normalisation, loss and epoch selection) are train.py's. Where the authors' code departs from the
paper, this file follows the paper (README: How it differs from the authors' code).

Dtype policy, stated once: frozen weights fp16/bf16 on GPU, as stored on CPU; trainable weights fp32;
LayerNorm, RMSNorm, RoPE and softmax in fp32. Each trainable module casts its input to its own dtype
and its output back, so the model runs with or without autocast.
"""
import json
import re
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from safeload import CheckpointError, read_safetensors, read_tensors, read_torchscript

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors' code normalises with these
IMAGENET_STD = (0.229, 0.224, 0.225)


# config: defaults are the real shapes (CLIP ViT-L/14, LLaMA-7B)
@dataclass
class VisionArgs:  # read from the checkpoint's shapes (and a Hugging Face config) by the loaders
    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    act: str = "quick_gelu"  # OpenAI's CLIP; OpenCLIP/LAION towers use exact "gelu"


@dataclass
class LlamaArgs:  # field names as in Meta's params.json, so LlamaArgs(**params) just works
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention (LLaMA-2 70B, LLaMA-3)
    vocab_size: int = -1  # only the text branch (question != []) loads the token embedding
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    ffn_hidden: Optional[int] = None  # set from Hugging Face's intermediate_size; else Meta's rule

    def hidden_dim(self) -> int:  # Meta's FeedForward sizing: 2/3 of 4*dim, times the multiplier, rounded up
        h = int((self.ffn_dim_multiplier or 1) * int(2 * 4 * self.dim / 3))
        return self.ffn_hidden or self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


@dataclass
class PneumoArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    llama: LlamaArgs = field(default_factory=LlamaArgs)
    cls_blocks: Optional[list] = None  # 1-based ViT blocks whose CLS token is kept; None: 4, 8, .., 24
    n_diag: int = 4  # K diagnosis tokens
    engine_hidden: int = 12
    adapter_hidden: int = 8
    adapter_groups: int = 2
    adapter_dropout: float = 0.1
    proj_hidden: int = 128
    n_classes: int = 2
    # ablations (Tables 4-6, Fig. 6 of the paper); the defaults are PneumoLLM as published
    engine: str = "multi"  # "multi" (Eq. 1) | "coop" | "cocoop" | "none"
    emitter: bool = True  # Eq. 2; False: every token attends to every token
    vit_adapters: bool = True
    llm_adapters: bool = True
    llm: bool = True  # False: no LLaMA (Table 4), the head reads the projected tokens
    encoder: str = "clip"  # "clip" | "conv": a trainable 14x14 conv stem whose patch tokens are the sources
    question_ids: list = field(default_factory=list)  # token ids of a fixed question, LaVIN-style (Table 5)
    train_engine: bool = True  # False: the authors' code, whose engine stays at its random init

    def __post_init__(self):
        if self.engine not in ("multi", "coop", "cocoop", "none") or self.encoder not in ("clip", "conv"):
            raise ValueError(f"unknown engine {self.engine!r} or encoder {self.encoder!r}")
        if self.question_ids and (not self.llm or self.llama.vocab_size <= 0):
            raise ValueError("a question needs the LLM and its vocab_size (the token embedding's rows)")
        b = self.cls_blocks = sorted(self.cls_blocks or range(4, self.vision.layers + 1, 4))
        if self.encoder == "clip" and not (b and 1 <= b[0] <= b[-1] <= self.vision.layers):
            raise ValueError(f"CLS blocks {b} must lie in 1..{self.vision.layers} (the ViT's blocks)")
        if len(set(b)) != len(b):  # one block gives one CLS token, however often it is named
            raise ValueError(f"CLS blocks {b} name a block twice; name each once")
        if self.n_diag < 1 and self.engine != "none":
            raise ValueError(f"engine {self.engine!r} needs at least one diagnosis token, not {self.n_diag}")


def tiny_args(vocab_size=-1, **kw) -> PneumoArgs:  # a few-MB model for tests and CPU demos
    v = VisionArgs(width=64, layers=4, heads=4, patch_size=28, image_size=224)
    kw["cls_blocks"] = kw.get("cls_blocks") or [1, 2, 3, 4]
    llama = LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=vocab_size, multiple_of=32)
    return PneumoArgs(v, llama, **kw)


# primitives
class LayerNorm(nn.LayerNorm):  # CLIP's: computed in fp32 whatever the weights' dtype
    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def rms_norm(x, eps: float):  # in fp32, no weight
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.eps) * self.weight


class RepAdapter(nn.Module):
    """x + up(dropout(down(x))): down C->h with bias, up h->C grouped (group g maps hidden units
    [g*h/G, (g+1)*h/G) to channels [g*C/G, (g+1)*C/G)). `up` starts at zero, so the adapter starts
    as the identity. Affine at inference, hence foldable into the next linear layer (`dense`)."""

    def __init__(self, dim: int, hidden: int, groups: int, dropout: float):
        super().__init__()
        self.groups = groups
        self.down = nn.Linear(dim, hidden)
        self.up_weight = nn.Parameter(torch.empty(dim, hidden // groups))  # (C, h/G)
        self.up_bias = nn.Parameter(torch.empty(dim))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)

    def forward(self, x):  # (..., C)
        h = self.dropout(self.down(x.to(self.up_weight.dtype)))  # (..., h)
        h = h.unflatten(-1, (self.groups, -1))  # (..., G, h/G)
        w = self.up_weight.unflatten(0, (self.groups, -1))  # (G, C/G, h/G)
        y = torch.einsum("...gi,goi->...go", h, w).flatten(-2) + self.up_bias  # (..., C)
        return x + y.to(x.dtype)

    def factors(self):  # the adapter as x -> x + U D x + c (fp32): U (C, h) block-diagonal, D (h, C), c (C,)
        up = torch.block_diag(*self.up_weight.float().chunk(self.groups, 0))
        return up, self.down.weight.float(), up @ self.down.bias.float() + self.up_bias.float()


def make_adapter(dim: int, a: PneumoArgs, on: bool) -> nn.Module:
    return RepAdapter(dim, a.adapter_hidden, a.adapter_groups, a.adapter_dropout) if on else nn.Identity()


# CLIP vision transformer (keys as in OpenAI's checkpoint: visual.*)
class MultiheadAttention(nn.Module):  # nn.MultiheadAttention's parameter layout, SDPA inside
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # (B, L, W)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).flatten(2))


QUICK_GELU = 1.702  # OpenAI's QuickGELU: h sigmoid(1.702 h) = silu(1.702 h) / 1.702
# "silu": QuickGELU with its 1.702 moved into c_fc and c_proj, one pass instead of three (cpu_policy.fold_quick_gelu)
ACTIVATIONS = dict(quick_gelu=lambda h: h * torch.sigmoid(QUICK_GELU * h), gelu=F.gelu, silu=F.silu)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, a: PneumoArgs, adapter: bool):
        super().__init__()
        self.act = a.vision.act  # a key of ACTIVATIONS
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)
        self.adapter_attn = make_adapter(width, a, adapter)

    def forward(self, x):
        x = x + self.attn(self.adapter_attn(self.ln_1(x)))
        return x + self.mlp.c_proj(ACTIVATIONS[self.act](self.mlp.c_fc(self.ln_2(x))))


class VisionTransformer(nn.Module):
    """CLIP's vision tower up to the residual stream: the raw CLS token after each block in
    `a.cls_blocks`, later ones skipped. Raw, as the paper takes them: ln_post and proj were trained
    to map the last block's token into CLIP's joint space, not an intermediate one, and the engine
    mixes tokens of several depths in the residual stream's own coordinates. `grad_checkpointing`:
    each block recomputed in the backward (+25 % time)."""

    def __init__(self, a: PneumoArgs):
        super().__init__()
        v, self.cls_blocks = a.vision, a.cls_blocks
        grid = v.image_size // v.patch_size
        self.conv1 = nn.Conv2d(3, v.width, v.patch_size, v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(v.width**-0.5 * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(v.width**-0.5 * torch.randn(grid * grid + 1, v.width))
        self.ln_pre = LayerNorm(v.width)
        # blocks past the last kept one are loaded but never run, so they get no adapter
        blocks = [ResidualAttentionBlock(v.width, v.heads, a, a.vit_adapters and i < self.cls_blocks[-1])
                  for i in range(v.layers)]
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(blocks)))
        self.grad_checkpointing = False

    def forward(self, img):  # (B, 3, H, W)
        x = self.conv1(img.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, L, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))  # (B, L+1, W)
        out = []
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.resblocks[:self.cls_blocks[-1]]):
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            if i + 1 in self.cls_blocks:
                out.append(x[:, 0])
        return torch.stack(out, 1)  # (B, n, W)


class ConvStem(nn.Module):  # Fig. 6a's "Conv14": one trainable patchify conv, no pretraining
    def __init__(self, v: VisionArgs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, v.width, v.patch_size, v.patch_size)

    def forward(self, img):  # (B, 3, H, W) -> patch tokens (B, L, W), the engine's source tokens
        return self.conv1(img.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)


# LLaMA blocks (keys as in Meta's checkpoint: layers.*, norm.*), no embedding, no output layer
def rope(x, cos, sin):  # x (B, T, h, d), pairs interleaved as Meta's rows: (x0, x1) turns by angle 0, ..
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, h, d/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, p: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv = p.n_heads, p.n_kv_heads or p.n_heads
        hd = p.dim // p.n_heads
        self.wq = nn.Linear(p.dim, p.n_heads * hd, bias=False)  # merge_adapters() may add biases
        self.wk = nn.Linear(p.dim, self.n_kv * hd, bias=False)
        self.wv = nn.Linear(p.dim, self.n_kv * hd, bias=False)
        self.wo = nn.Linear(p.n_heads * hd, p.dim, bias=False)

    def forward(self, x, cos, sin, mask):  # x (B, T, D), mask (T, T) additive
        q = rope(self.wq(x).unflatten(-1, (self.n_heads, -1)), cos, sin).transpose(1, 2)  # (B, h, T, d)
        k = rope(self.wk(x).unflatten(-1, (self.n_kv, -1)), cos, sin).transpose(1, 2)  # (B, kv, T, d)
        v = self.wv(x).unflatten(-1, (self.n_kv, -1)).transpose(1, 2)
        if self.n_kv != self.n_heads:  # kv head j serves query heads j*r .. j*r + r - 1
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, 1) for t in (k, v))
        # the fused kernels keep the softmax in fp32 whatever the input dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
        return self.wo(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):  # SwiGLU
    def __init__(self, p: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(p.dim, p.hidden_dim(), bias=False)
        self.w2 = nn.Linear(p.hidden_dim(), p.dim, bias=False)
        self.w3 = nn.Linear(p.dim, p.hidden_dim(), bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, a: PneumoArgs):
        super().__init__()
        p = a.llama
        self.attention, self.feed_forward = Attention(p), FeedForward(p)
        self.attention_norm, self.ffn_norm = RMSNorm(p.dim, p.norm_eps), RMSNorm(p.dim, p.norm_eps)
        self.adapter_attn = make_adapter(p.dim, a, a.llm_adapters)

    def forward(self, x, cos, sin, mask):
        h = x + self.attention(self.adapter_attn(self.attention_norm(x)), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, a: PneumoArgs):
        super().__init__()
        self.p = a.llama
        self.layers = nn.ModuleList(TransformerBlock(a) for _ in range(self.p.n_layers))
        self.norm = RMSNorm(self.p.dim, self.p.norm_eps)
        self.tok_embeddings = nn.Embedding(self.p.vocab_size, self.p.dim) if a.question_ids else None

    def rope_tables(self, t: int, device):  # cos, sin (T, 1, d/2) for positions 0..T-1, fp32
        hd = self.p.dim // self.p.n_heads
        freqs = self.p.rope_theta ** -(torch.arange(0, hd, 2, device=device).float() / hd)
        angles = torch.outer(torch.arange(t, device=device).float(), freqs)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, h, mask):  # h (B, T, D), mask (T, T) or None -> final-normed (B, T, D)
        cos, sin = self.rope_tables(h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.norm(h)


# PneumoLLM's own parts: engine, projection, emitter mask, head
class MultiTokenEngine(nn.Module):  # Eq. 1: each diagnosis token is a convex combination of the CLS tokens
    def __init__(self, width: int, hidden: int, k: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, k)

    def weights(self, cls):  # (B, n, W) -> (B, K, n): how much each diagnosis token takes from each CLS token
        return self.fc2(F.relu(self.fc1(cls.to(self.fc1.weight.dtype)))).transpose(1, 2).softmax(-1)

    def forward(self, cls):  # (B, n, W) -> (B, K, W)
        return (self.weights(cls) @ cls.to(self.fc1.weight.dtype)).to(cls.dtype)


class LearnedTokens(nn.Module):
    """Table 6's prompt-learning baselines. CoOp: K tokens learned once, shared by every image. CoCoOp
    (`conditional`): plus a per-image shift from a meta-net on the deepest CLS token (CoCoOp's names)."""

    def __init__(self, width: int, k: int, conditional: bool):
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(k, width))
        hidden = width // 16
        layers = OrderedDict(linear1=nn.Linear(width, hidden), relu=nn.ReLU(),
                             linear2=nn.Linear(hidden, width))
        self.meta_net = nn.Sequential(layers) if conditional else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.ctx, std=0.02)  # CoOp's init

    def forward(self, cls):  # (B, n, W) -> (B, K, W)
        ctx = self.ctx.expand(cls.shape[0], -1, -1)
        if self.meta_net is not None:
            ctx = ctx + self.meta_net(cls[:, -1].to(self.ctx.dtype))[:, None]
        return ctx.to(cls.dtype)


def make_engine(a: PneumoArgs) -> Optional[nn.Module]:
    if a.engine == "multi":
        return MultiTokenEngine(a.vision.width, a.engine_hidden, a.n_diag)
    return None if a.engine == "none" else LearnedTokens(a.vision.width, a.n_diag, a.engine == "cocoop")


class Projection(nn.Module):  # ViT width -> LLaMA dim; xavier weights, zero biases, no norm
    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self):
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x):  # (B, T, W) -> (B, T, D) in fp32
        return self.fc2(F.silu(self.fc1(x.to(self.fc1.weight.dtype))))


def emitter_mask(n: int, k: int, device=None) -> torch.Tensor:
    """Eq. 2, additive (T, T) with T = n + K: every row may look at the n source (CLS) columns only, so
    CLS tokens never see diagnosis tokens and each diagnosis token reads the sources alone (question
    tokens too)."""
    mask = torch.zeros(n + k, n + k, device=device)
    mask[:, n:] = float("-inf")
    return mask


def normalise(x: torch.Tensor, size: int, norm="clip") -> torch.Tensor:  # (B, 1, H, W) uint8 -> (B, 3, S, S)
    """What forward() expects: grey to CLIP's (default) or ImageNet's ("imagenet", the authors' code)
    normalised RGB, resized to the ViT's input if the data's size differs (better: prepare.py --size)."""
    mean, std = (CLIP_MEAN, CLIP_STD) if norm == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    x = x.float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # (x / 255 - m) / s on each of the grey channel's three copies, two passes each; Python floats: no copy
    return torch.cat([(x - 255 * m).mul_(1 / (255 * s)) for m, s in zip(mean, std)], 1)


class PneumoLLM(nn.Module):
    def __init__(self, a: PneumoArgs):
        super().__init__()
        self.args = a
        self.visual = VisionTransformer(a) if a.encoder == "clip" else ConvStem(a.vision)
        self.engine = make_engine(a)
        self.proj = Projection(a.vision.width, a.proj_hidden, a.llama.dim)
        self.llama = Llama(a) if a.llm else None
        self.head = nn.Linear(a.llama.dim, a.n_classes, bias=False)
        # the question's token ids on the model's device, built once (not copied to it on every step)
        self.register_buffer("question", torch.tensor(a.question_ids, dtype=torch.long), persistent=False)
        self.requires_grad_(False)
        for m in self.own_modules():
            m.requires_grad_(True)
        if self.engine is not None and not a.train_engine:
            self.engine.requires_grad_(False)

    def own_modules(self) -> list:
        """What this project creates rather than reads from CLIP/LLaMA, chosen by module type, never by
        parameter name: adapters, (conv stem,) engine, projection, head. All saved; trained unless
        train_engine=False. Not by name: the authors' code picks trainable parameters by matching
        names, and its pattern misses the engine, which stays frozen at its random init."""
        adapters = [m for m in self.modules() if isinstance(m, RepAdapter)]
        stem = [self.visual] if isinstance(self.visual, ConvStem) else []
        return adapters + stem + [m for m in (self.engine, self.proj, self.head) if m is not None]

    def own_state_dict(self) -> dict:  # saved with a run; the rest is CLIP's and LLaMA's, frozen
        ids = {id(p) for m in self.own_modules() for p in m.parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in ids}

    def frozen_parameters(self) -> list:  # CLIP's and LLaMA's
        own = {id(p) for p in self.own_state_dict().values()}
        return [p for p in self.parameters() if id(p) not in own]

    def trainable_parameters(self) -> list:
        return [p for p in self.own_state_dict().values() if p.requires_grad]

    def forward(self, images):  # (B, 3, H, W) normalised -> logits (B, C) in fp32
        a = self.args
        src = self.visual(images)  # (B, n, W): CLS tokens (patch tokens for the conv stem)
        diag = self.engine(src) if self.engine is not None else src[:, :0]  # (B, K, W)
        h = self.proj(torch.cat([src, diag], 1))  # (B, T, D) fp32
        if self.llama is None:  # Table 4: no LLM, a weightless RMSNorm stands in for LLaMA's final norm
            h = rms_norm(h, a.llama.norm_eps)
        else:
            h = h.to(self.llama.norm.weight.dtype)
            if a.question_ids:  # Table 5: the question's token embeddings go first, as source tokens
                q = self.llama.tok_embeddings(self.question)  # (Q, D)
                h = torch.cat([q.expand(h.shape[0], -1, -1), h], 1)  # (B, Q+T, D)
            k = diag.shape[1]
            h = self.llama(h, emitter_mask(h.shape[1] - k, k, h.device) if a.emitter and k else None)
        return self.head(h.mean(1).to(self.head.weight.dtype))

    @torch.no_grad()
    def merge_adapters(self, llm=True):
        """Re-parameterisation: fold each adapter x -> x + U D x + c into the q/k/v after it,
        W' = W + (W U) D (rank h), b' = W c + b, and drop it. On a CPU it copies memory-mapped q/k/v
        pages; scoring there merges the ViT's only (llm=False), whose q/k/v it has converted already."""
        vit = self.visual.transformer.resblocks if isinstance(self.visual, VisionTransformer) else []
        layers = self.llama.layers if self.llama is not None and llm else []
        targets = [(b, [(b.attn, "in_proj_weight", "in_proj_bias")]) for b in vit]
        targets += [(b, [(getattr(b.attention, w), "weight", "bias") for w in ("wq", "wk", "wv")])
                    for b in layers]
        for block, linears in targets:
            if isinstance(block.adapter_attn, RepAdapter):
                up, down, c = block.adapter_attn.factors()
                for m, w_name, b_name in linears:
                    w, b = getattr(m, w_name), getattr(m, b_name)
                    bias = w.float() @ c + (0 if b is None else b.float())
                    setattr(m, b_name, nn.Parameter(bias.to(w.dtype), requires_grad=False))
                    w.copy_(w.float() + (w.float() @ up) @ down)
                block.adapter_attn = nn.Identity()


# -----------------------------------------------------------------------------------------------
# loaders: read the original files lazily; a checkpoint key maps to (file, original key, getter)


Entry = namedtuple("Entry", "file key get")  # key: as the file spells it, for messages; get() -> the tensor

# What the checkpoints hold that this model deliberately does not use (full-match regexes).
CLIP_IGNORE = [
    r"visual\.(ln_post\.(weight|bias)|proj)",  # CLIP's image head: we take the raw CLS stream
    r"(transformer|token_embedding|ln_final)\..*|positional_embedding|text_projection",  # text tower
    r"logit_scale|input_resolution|context_length|vocab_size",  # metadata in OpenAI's files
    r"text_model\..*|(text|visual)_projection\.weight|vision_model\.embeddings\.position_ids",  # HF's extras
]
LLAMA_IGNORE = [
    r"tok_embeddings\.weight|output\.weight",  # no text input, no next-token output
    r"rope\.freqs|layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # RoPE tables, recomputed here
]


# Hugging Face's layouts (config.json + *.safetensors), read lazily under OpenAI's and Meta's key names


def _safetensors(files) -> dict:
    out = {}
    for file in files:
        out.update({k: Entry(str(file), k, lambda t=t: t) for k, t in read_safetensors(file).items()})
    return out


def _renamed(entries: dict, table: list) -> dict:  # {Hugging Face key: e} -> {OpenAI's / Meta's key: e}
    out = {}
    for k, e in entries.items():
        for pat, rep in table:
            k = re.sub(pat, rep, k)
        out[k] = e
    return out


def _check_config(folder: Path, c: dict, allowed: dict):  # {field: (default, other values this model computes)}
    for name, values in allowed.items():
        if c.get(name, values[0]) not in values:
            raise CheckpointError(f"{folder}/config.json: {name} = {c[name]!r} is not supported (this model "
                                  f"computes {' or '.join(map(repr, values))})")


_HF_CLIP = [  # Hugging Face name -> OpenAI name
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"), (r"mlp\.fc1\.", "mlp.c_fc."),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"), (r"mlp\.fc2\.", "mlp.c_proj."),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.", "visual.ln_pre."), (r"vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"vision_model\.encoder\.layers\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"self_attn\.out_proj\.", "attn.out_proj."), (r"layer_norm(\d)\.", r"ln_\1."),
]


def _fused_qkv(entries: dict) -> dict:  # q, k, v fused into nn.MultiheadAttention's in_proj, in that order
    out, qkv = {}, {}
    for k, e in entries.items():
        m = re.fullmatch(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault(f"{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = e
        else:
            out[k] = e
    for k, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{parts[next(iter(parts))].file}: {k} lacks one of q/k/v_proj")
        out[k] = Entry(parts["q"].file, parts["q"].key, lambda p=parts: torch.cat([p[x].get() for x in "qkv"]))
    return out


def read_clip_hf(folder: Path, act=None) -> tuple[VisionArgs, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    c = cfg.get("vision_config", cfg)
    _check_config(folder, c, dict(hidden_act=("quick_gelu", "gelu"), layer_norm_eps=(1e-5,), num_channels=(3,)))
    hidden_act = c.get("hidden_act", "quick_gelu")
    if act and act != hidden_act:
        raise CheckpointError(f"{folder}/config.json: hidden_act is {hidden_act!r}, not --clip-act {act!r}")
    v = VisionArgs(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["patch_size"],
                   c["image_size"], hidden_act)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files next to config.json")
    entries = _safetensors(files)
    if not any(k.startswith("vision_model.") for k in entries):  # a CLIPVisionModel saved without its prefix
        entries = {"vision_model." + k: e for k, e in entries.items()}
    return v, _fused_qkv(_renamed(entries, _HF_CLIP))


def read_clip(path, act=None, heads=None) -> tuple[VisionArgs, dict]:
    """OpenAI's TorchScript `ViT-L-14.pt`, an OpenAI-layout state dict (OpenAI's, OpenCLIP's) or a Hugging Face
    folder. `act`: the MLP's; only a Hugging Face config states it, else QuickGELU unless "gelu" (LAION's).
    `heads`: the attention heads; a Hugging Face config states them; an OpenAI-layout file does not, and
    OpenAI's rule (64-wide heads) holds up to ViT-L's width, not for OpenCLIP's wider towers (ViT-H: 16 of 80)."""
    path = Path(path)
    if path.is_dir():
        v, entries = read_clip_hf(path, act)
        if heads and heads != v.heads:
            raise CheckpointError(f"{path}/config.json: num_attention_heads is {v.heads}, not --clip-heads {heads}")
        return v, entries
    sd = ts if (ts := read_torchscript(path)) is not None else read_tensors(path)  # {} is an empty archive
    if "conv1.weight" in sd:  # a vision-only OpenAI-layout file
        sd = {"visual." + k: t for k, t in sd.items()}
    if "visual.conv1.weight" not in sd:
        raise CheckpointError(f"{path}: no visual.conv1.weight, not an OpenAI CLIP checkpoint")
    conv, pos = sd["visual.conv1.weight"], sd["visual.positional_embedding"]
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    grid = round((pos.shape[0] - 1) ** 0.5)
    width = conv.shape[0]
    if not heads and (width > 1024 or width % 64):
        raise CheckpointError(f"{path}: a ViT {width} wide, whose head count the file does not state (OpenAI's "
                              "rule, heads 64 wide, ends at ViT-L's 1024; OpenCLIP's ViT-H/14 has 16 heads of 80): "
                              "pass --clip-heads N")
    if heads and width % heads:
        raise CheckpointError(f"{path}: --clip-heads {heads} does not divide the ViT's width {width}")
    v = VisionArgs(width, layers, heads or width // 64, conv.shape[-1], conv.shape[-1] * grid, act or "quick_gelu")
    # the text tower's keys are listed too, to be checked against CLIP_IGNORE (never copied into the model)
    return v, {k: Entry(str(path), k, lambda t=t: t) for k, t in sd.items()}


# model-parallel shards: column-parallel weights split along dim 0, row-parallel along 1; the rest replicated
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _merged_shards(file: str, shards: list) -> dict:  # Meta's model-parallel shards, concatenated when read
    out = {}
    for k in shards[0]:
        dim = _SHARD_DIM.get(k.split(".")[-2] if k.endswith(".weight") else k) if len(shards) > 1 else None
        get = partial(torch.cat, [s[k] for s in shards], dim) if dim is not None else (lambda t=shards[0][k]: t)
        out[k] = Entry(file, k, get)
    return out


def _read_llama_meta(folder: Path):
    params = json.loads((folder / "params.json").read_text())
    if params.pop("use_scaled_rope", False):
        raise CheckpointError(f"{folder}/params.json: use_scaled_rope (LLaMA-3.1) is not supported")
    params = {k: v for k, v in params.items() if k not in ("max_seq_len", "max_batch_size")}  # not the model's
    unknown = set(params) - {f.name for f in fields(LlamaArgs)}
    if unknown:
        raise CheckpointError(f"{folder}/params.json: unknown setting(s) {sorted(unknown)}")
    p = LlamaArgs(**params)
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth next to params.json")
    shards = [read_tensors(f) for f in files]
    if p.vocab_size <= 0 and "tok_embeddings.weight" in shards[0]:  # params.json says -1; the text branch needs it
        p.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    return p, _merged_shards(str(files[0]), shards)


_HF_LLAMA = [  # Hugging Face name -> Meta name
    (r"model\.embed_tokens\.", "tok_embeddings."), (r"model\.norm\.", "norm."), (r"lm_head\.", "output."),
    (r"model\.layers\.", "layers."), (r"self_attn\.([qkvo])_proj\.", r"attention.w\1."),
    (r"mlp\.gate_proj\.", "feed_forward.w1."), (r"mlp\.down_proj\.", "feed_forward.w2."),
    (r"mlp\.up_proj\.", "feed_forward.w3."), (r"input_layernorm\.", "attention_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
]


def _interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:  # (h*d, D) rows (x_i, x_i+d/2) -> (x_2i, x_2i+1)
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).reshape(w.shape)  # a copy (on a CPU too)


def read_llama_hf(folder: Path) -> tuple[LlamaArgs, dict]:
    c = json.loads((folder / "config.json").read_text())
    heads = c["hidden_size"] // c["num_attention_heads"]
    _check_config(folder, c, dict(hidden_act=("silu",), attention_bias=(False,), mlp_bias=(False,),
                                  head_dim=(None, heads), pretraining_tp=(1,)))
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{folder}/config.json: rope scaling {rope.get('rope_type')} is not supported")
    p = LlamaArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                  n_kv_heads=c.get("num_key_value_heads"), vocab_size=c.get("vocab_size", -1),
                  norm_eps=c.get("rms_norm_eps", 1e-6),
                  rope_theta=c.get("rope_theta", rope.get("rope_theta", 1e4)),
                  ffn_hidden=c["intermediate_size"])
    index = folder / "model.safetensors.index.json"
    names = ["model.safetensors"]
    if index.exists():  # sharded: the index maps every key to its file
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    entries = _renamed(_safetensors([folder / n for n in names]), _HF_LLAMA)
    for k, e in entries.items():  # Hugging Face permuted q/k rows for its rotate_half RoPE: back to Meta's pairs
        if m := re.fullmatch(r"layers\.\d+\.attention\.w([qk])\.weight", k):
            heads = p.n_heads if m[1] == "q" else p.n_kv_heads or p.n_heads
            entries[k] = e._replace(get=lambda g=e.get, h=heads: _interleaved(g(), h))
    return p, entries


def read_llama(path) -> tuple[LlamaArgs, dict]:
    """Meta's folder (params.json + consolidated.NN.pth) or a Hugging Face folder (config.json +
    model*.safetensors, with or without an index). Keys come back in Meta's naming."""
    path = Path(path)
    if (path / "params.json").exists():
        return _read_llama_meta(path)
    if (path / "config.json").exists():
        return read_llama_hf(path)
    raise CheckpointError(f"{path}: neither params.json (Meta) nor config.json (Hugging Face) found")


def _load_frozen(model: nn.Module, scope: str, strip: str, entries: dict, ignore: list, device, dtype):
    """Copy a checkpoint into the frozen parameters under `scope` (name = `strip` + key), loudly: an
    unexpected key (unless ignored above), a missing key or a shape mismatch names the key and file."""
    ignored = re.compile("|".join(f"(?:{p})" for p in ignore))
    params = {n: p for n, p in model.named_parameters() if n.startswith(scope) and not p.requires_grad}
    for k, e in entries.items():
        if strip + k not in params and not ignored.fullmatch(k):
            raise CheckpointError(f"{e.file}: unexpected key {e.key!r} (read as {k!r})")
    for name, p in params.items():
        e = entries.get(name[len(strip):])
        if e is None:
            raise CheckpointError(f"{next(iter(entries.values())).file}: missing key {name[len(strip):]!r}")
        t = e.get()
        if t.shape != p.shape:
            raise CheckpointError(f"{e.file}: {e.key!r} is {list(t.shape)}, expected {list(p.shape)}")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Parameter(t.to(device, dtype), requires_grad=False))


def materialise_own(model: PneumoLLM, device):
    """Create this project's own parts (fp32, freshly initialised) of a model built on `meta`."""
    for m in model.own_modules():  # children first, so a module's own init has the last word
        m.to_empty(device=device)
        for sub in reversed(list(m.modules())):
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    model.question = torch.tensor(model.args.question_ids, dtype=torch.long, device=device)
    stuck = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not stuck, f"left on the meta device: {stuck[:3]}"


def from_pretrained(clip, llama, device="cpu", dtype=None, clip_act=None, clip_heads=None, **kw) -> PneumoLLM:
    """Build PneumoLLM on `meta`, map the original checkpoints into it, then create this project's own parts (fp32)
    on `device`. Frozen weights: as stored on CPU (memory-mapped), fp16 elsewhere, unless `dtype` is given. `kw`:
    PneumoArgs fields; encoder="conv" ignores `clip`; llm=False reads no LLaMA (`llama` may be None: width 4096)."""
    if kw.get("llm", True) and not llama:
        raise CheckpointError("the LLM is on (llm=True) and no LLaMA checkpoint was given: pass one, or llm=False")
    device = torch.device(device)
    dtype = dtype or (None if device.type == "cpu" else torch.float16)
    clip_used = kw.get("encoder", "clip") == "clip"
    vision, clip_entries = read_clip(clip, clip_act, clip_heads) if clip_used else (kw.pop("vision", VisionArgs()), {})
    llama_args, llama_entries = read_llama(llama) if llama else (LlamaArgs(), {})  # llm=False: only its width
    with torch.device("meta"):
        model = PneumoLLM(PneumoArgs(vision=vision, llama=llama_args, **kw))
    if clip_entries:
        _load_frozen(model, "visual.", "", clip_entries, CLIP_IGNORE, device, dtype)
    if model.llama is not None:
        _load_frozen(model, "llama.", "llama.", llama_entries, LLAMA_IGNORE, device, dtype)
    materialise_own(model, device)
    vit = f"{clip}: ViT {vision.width}x{vision.layers}" if clip_entries else "conv stem (no CLIP)"
    llm = f"{llama}: LLaMA {llama_args.dim}x{llama_args.n_layers}" if model.llama is not None else "no LLM"
    print(f"loaded {vit} + {llm}, frozen {dtype or 'as stored'} on {device}, "
          f"{sum(p.numel() for p in model.trainable_parameters()):,} trainable")
    return model
