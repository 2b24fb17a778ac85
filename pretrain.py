"""
The demo's frozen backbones, made once: a tiny CLIP ViT pretrained on other synthetic patients,
saved in OpenAI's layout, and a tiny random LLaMA in Meta's, both read by the same loaders as the
real checkpoints. `train.py --model tiny` calls it when they are missing; by hand:

    python pretrain.py checkpoints/tiny      # ViT-tiny.pt + llama-tiny/ (params.json, consolidated.00.pth)

What the encoder learns, before and apart from the task, as CLIP learns to describe images: from
its image embedding (the last CLS token, ln_post, proj) it reconstructs each film's 8 x 8 thumbnail
(self-supervised: the target is the film itself, as an autoencoder's) and states the film's anatomy
(how far the body is shifted, its scale, the heart's size); from each patch's own token it states
how much fine grain the patch holds. Most of its patch filters (FIXED of WIDTH) are zero-mean random
ones, fixed, so that grain a few grey levels high is not drowned by brightness: a tiny encoder
trained on two cores does not learn such filters (docs/demo.md), CLIP's first layer has them. Its
1,200 films (a tenth held out to say what it learned) are drawn by demo.phantom from another seed
(other patients) with no disease at all, generic grain added anywhere: it never sees an opacity of
the demo's disease, a diseased film or a label. The LLaMA is random: no language can be learned from
phantoms; its blocks carry the architecture and exercise Meta's loader.
"""
import argparse
import json
import math
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

import demo
import pneumollm as P
from folders import replacing, write_atomic
from lungcrop import resized, thorax_box

FILMS, EPOCHS, BATCH, LR, SEED = 1200, 16, 32, 2e-3, 1000  # demo.py's patients come from seeds 20, 21, ..
WIDTH, LAYERS, PATCH, EMBED, THUMB = 64, 4, 28, 64, 8  # one 64-wide head (CLIP's head width), 8 x 8 patches
FIXED, GAIN = 48, 3.0  # patch filters fixed at zero-mean random ones, their responses GAIN x unit spread


def film(job) -> tuple:
    """One pretraining film as prepare.py frames it: (224, 224) uint8, and its (3 + 64 + 64,) targets:
    the body's shift and scale and the heart's size; the 8 x 8 thumbnail (each 28 px patch's mean, 0-1);
    each patch's fine grain (the log spread of the crop minus its 3 x 3 blur). The film carries generic
    grain anywhere in it, as photographs carry texture: 0-4 discs of noise of one of four scales."""
    seed, i = job
    rng = np.random.default_rng([seed, i])
    img, anatomy, _, _, (shift, scale, heart) = demo.phantom(rng, profusion=0.0, heart=rng.uniform(0.8, 1.35))
    yy, xx = np.mgrid[0:demo.SIZE, 0:demo.SIZE]
    for _ in range(rng.integers(0, 5)):
        (cy, cx), r = rng.integers(40, demo.SIZE - 40, 2), rng.uniform(20, 120)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img += disc * demo.smooth_noise(rng, int(rng.choice([64, 128, 256, 512])), rng.uniform(0.01, 0.06))
    lo, hi = np.percentile(anatomy, [1, 99.5])  # the window demo.to_dicom writes
    img8 = (np.clip((img - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)
    crop = resized(img8, thorax_box(img8.shape), 224)
    fine = crop - np.asarray(Image.fromarray(crop).filter(ImageFilter.BoxBlur(1)), np.float32)
    thumb, grain = (a.reshape(THUMB, PATCH, THUMB, PATCH) for a in (crop / 255, fine))
    return crop, np.concatenate([[shift, scale, heart], thumb.mean((1, 3)).ravel(),
                                 np.log(grain.std((1, 3)).ravel() + 0.5)]).astype(np.float32)


class TinyCLIP(nn.Module):  # OpenAI's visual.* keys: the ViT, ln_post and proj; the heads are not saved
    def __init__(self):
        super().__init__()
        vision = P.VisionArgs(WIDTH, LAYERS, WIDTH // 64, PATCH, 224)
        self.visual = P.VisionTransformer(P.PneumoArgs(vision, vit_adapters=False, cls_blocks=[LAYERS]))
        self.visual.ln_post = P.LayerNorm(WIDTH)
        self.visual.proj = nn.Parameter(WIDTH**-0.5 * torch.randn(WIDTH, EMBED))
        self.head = nn.Linear(EMBED, 3 + THUMB * THUMB)
        self.grain = nn.Linear(WIDTH, 1)  # from each patch's own token

    def forward(self, img):  # (B, 3, 224, 224) normalised -> (B, 3 + 64 + 64) predicted targets
        v = self.visual
        x = v.conv1(img).flatten(2).transpose(1, 2)  # (B, 64, W) patch tokens
        x = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding)
        for block in v.transformer.resblocks:
            x = block(x)
        return torch.cat([self.head(v.ln_post(x[:, 0]) @ v.proj), self.grain(x[:, 1:])[..., 0]], 1)

    @torch.no_grad()
    def fix_filters(self, x: torch.Tensor) -> torch.Tensor:
        """The first FIXED patch filters made zero-mean random ones (blind to brightness, they see grain),
        each scaled to a spread of GAIN on the films x; fit() keeps them. Returns them."""
        w = self.visual.conv1.weight  # (W, 3, P, P)
        r = torch.randn(FIXED, 1, PATCH, PATCH)
        w[:FIXED] = (r - r.mean((2, 3), keepdim=True)).expand(-1, 3, -1, -1)
        spread = F.conv2d(P.normalise(x, 224), w[:FIXED], stride=PATCH).std((0, 2, 3))
        w[:FIXED] *= GAIN / spread.view(-1, 1, 1, 1)
        return w[:FIXED].clone()


def fit(model: TinyCLIP, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """AdamW, linear warmup then cosine, on (N, 1, 224, 224) uint8 films and (N, 131) targets."""
    fixed = model.fix_filters(x[:200])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    per_epoch = len(x) // BATCH
    steps, warm = epochs * per_epoch, min(50, epochs * per_epoch // 5)
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x))
        for g in opt.param_groups:
            g["lr"] = LR * min(1, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = order[step % per_epoch * BATCH:(step % per_epoch + 1) * BATCH]
        loss = F.mse_loss(model(P.normalise(x[idx], 224)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.visual.conv1.weight.data[:FIXED] = fixed


@torch.no_grad()
def explained(model: TinyCLIP, x: torch.Tensor, y: torch.Tensor) -> list:
    """R^2 of the anatomy's, the thumbnail's and the grain's targets: 1 - squared error / squared spread."""
    model.eval()
    err, spread = (model(P.normalise(x, 224)) - y) ** 2, (y - y.mean(0)) ** 2
    return [1 - (err[:, part].sum() / spread[:, part].sum()).item() for part in (slice(0, 3), slice(3, 67),
                                                                                  slice(67, None))]


def pretrain(folder: Path, films=FILMS, epochs=EPOCHS, seed=SEED, workers=None) -> Path:
    """Writes folder/ViT-tiny.pt and folder/llama-tiny/ unless they are there. Returns the folder."""
    clip, llama = folder / "ViT-tiny.pt", folder / "llama-tiny"
    if clip.exists() and (llama / "consolidated.00.pth").exists():
        return folder
    t0 = time.time()
    print(f"pretraining the tiny encoder on {films} films of other synthetic patients, no disease "
          f"(pretrain.py; once, ~1 min)", file=sys.stderr)
    with Pool(workers or os.cpu_count()) as pool:
        made = pool.map(film, [(seed, i) for i in range(films)], chunksize=16)
    x = torch.from_numpy(np.stack([m[0] for m in made])[:, None])  # (N, 1, 224, 224) uint8
    y = torch.from_numpy(np.stack([m[1] for m in made]))  # (N, 131)
    y = (y - y.mean(0)) / (y.std(0) + 1e-6)  # each target about unit variance
    torch.manual_seed(seed)
    model, held = TinyCLIP(), films // 10  # the first tenth is held out, to say what was learned
    fit(model, x[held:], y[held:], epochs)
    r2 = explained(model, x[:held], y[:held])
    folder.mkdir(parents=True, exist_ok=True)
    with replacing(clip) as tmp:
        torch.save({f"visual.{k}": t.half() for k, t in model.visual.state_dict().items()}, tmp)
    write_random_llama(llama, seed)
    print(f"wrote {clip} and {llama}/ in {time.time() - t0:.0f} s; on {held} held-out films the encoder "
          f"explains {r2[0]:.0%} of the anatomy's variance, {r2[1]:.0%} of the thumbnails' and {r2[2]:.0%} of the "
          "grain's", file=sys.stderr)
    return folder


def write_random_llama(folder: Path, seed: int):
    """A tiny LLaMA in Meta's layout (params.json, consolidated.00.pth), random weights, fp16."""
    torch.manual_seed(seed)
    a = P.tiny_args(llm_adapters=False)
    blocks = P.Llama(a).state_dict()  # module paths are Meta's keys
    folder.mkdir(parents=True, exist_ok=True)
    params = {k: getattr(a.llama, k) for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps", "vocab_size")}
    write_atomic(folder / "params.json", json.dumps(params, indent=1))
    with replacing(folder / "consolidated.00.pth") as tmp:
        torch.save({k: t.half() for k, t in blocks.items()}, tmp)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("folder", nargs="?", default="checkpoints/tiny", help="where to write them (default: "
                    "checkpoints/tiny, where train.py --model tiny reads them)")
    return ap


def main(argv=None) -> int:
    pretrain(Path(parser().parse_args(argv).folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
