"""
Why a score: which regions of the crop drove it, and which depths of the ViT the diagnosis tokens
read. Used by eval.py --explain; nothing here runs otherwise.

Grad-CAM over the ViT's patch tokens: for each block whose CLS token feeds the engine, the gradient
of a class's logit (the predicted class, or the one called at the run's threshold) with respect to
the patch tokens entering that block (those its CLS token reads; the patch tokens it outputs feed
only later blocks), times those tokens,
summed over channels, ReLU: a (grid, grid) map per block. The maps are averaged over those blocks
(the diagnosis tokens mix all of them), upsampled bilinearly to the crop and scaled to [0, 1]; a map
that is zero everywhere (a logit that does not depend on the image) stays zero. It runs with the
adapters as trained, merged or not: the gradient flows from the input.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pneumollm as P


def grad_cam(model: P.PneumoLLM, x: torch.Tensor, target=None) -> tuple:
    """x (B, 3, H, W) normalised, the classes to explain (B,) (default: the predicted ones) -> (maps
    (B, H, W) in [0, 1], the classes explained (B,), engine weights (B, K, n) or None when the engine
    is not the multi-token one)."""
    if not isinstance(model.visual, P.VisionTransformer):
        raise ValueError("explanations read the CLIP ViT's patch tokens; this run has no ViT (--encoder conv)")
    kept, tokens, weights = model.visual.cls_blocks, {}, {}
    hooks = [model.visual.transformer.resblocks[b - 1].register_forward_hook(  # what block b's CLS token reads
        lambda m, i, out, b=b: tokens.__setitem__(b, i[0])) for b in kept]
    if isinstance(model.engine, P.MultiTokenEngine):
        keep = lambda m, i, out: weights.update(w=m.weights(i[0]).detach())  # noqa: E731
        hooks.append(model.engine.register_forward_hook(keep))
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True)).float()  # (B, C)
            target = logits.argmax(-1) if target is None else torch.as_tensor(target, device=logits.device)
            grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), [tokens[b] for b in kept])
    finally:
        for h in hooks:
            h.remove()
    maps = torch.stack([F.relu((g[:, 1:] * tokens[b][:, 1:]).float().sum(-1)) for b, g in zip(kept, grads)])
    maps = maps.mean(0)  # (B, L): patches, over the blocks
    grid = int(round(maps.shape[1] ** 0.5))  # (B, L) patches -> (B, grid, grid)
    maps = F.interpolate(maps.view(-1, 1, grid, grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps[:, 0]
    peak = maps.flatten(1).amax(1)[:, None, None]
    maps = torch.where(peak > 0, maps / peak.clamp_min(1e-30), torch.zeros_like(maps))
    return maps.detach(), target, weights.get("w")


def explain_images(model: P.PneumoLLM, images: torch.Tensor, cfg: dict, target=None) -> tuple:
    """images (B, 1, H, W) uint8, as prepared -> (maps (B, H, W) in [0, 1] at the images' size, the
    classes explained, engine weights or None)."""
    x = P.normalise(images.to(cfg["device"]), model.args.vision.image_size, cfg["norm"])
    maps, target, weights = grad_cam(model, x, target)
    size = tuple(images.shape[-1:-3:-1])  # (W, H): the model may read another size (e.g. ViT-L/14@336)
    heats = np.stack([np.asarray(Image.fromarray(m).resize(size, Image.BILINEAR)) for m in maps.cpu().numpy()])
    return heats, target, weights


def describe_weights(weights: torch.Tensor, blocks: list) -> str:
    """The engine's softmax weights, averaged over the images: which ViT depths each diagnosis token reads."""
    mean = weights.float().mean(0)  # (K, n)
    lines = [f"engine weights over the CLS tokens after ViT blocks {blocks}, averaged over {len(weights)} "
             "image(s):"]
    lines += [f"  diagnosis token {k + 1}: " + "  ".join(f"{v:.2f}" for v in row.tolist())
              for k, row in enumerate(mean)]
    return "\n".join(lines)
