"""The demo's warm-up, which never sees a quality label or level (what a pretrained VLM would bring):
perception (the vision tower and a thrown-away probe learn the distortion FAMILY) and the answer
layout (the family word as reasoning, uniform targets at the score digits); also the auxiliary
family loss GRPO keeps, and the fast paths both use (patchify, vision_indices). demo.py runs them;
`demo` is a demo.Demo (the data), `cfg` a demo.DemoConfig (not imported: demo.py imports this file).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import rollouts
from mgiqa import ATTRIBUTES

FAMILIES = (None, "blur", "noise", "color", "composition")
WORDS = ("clean", "blurry", "noisy", "dull", "offcentre")


def patchify(images: np.ndarray, image_processor):
    """uint8 (N, S, S, 3) -> Qwen2-VL patch rows (N, patches, C*2*14*14), as the image processor
    makes them for a side that is a multiple of 28 (no resize), in one vectorised pass; checked
    against the processor on the first images."""
    N, H, W, C = images.shape
    ps, tp, ms = image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size
    mean = torch.tensor(image_processor.image_mean).view(1, C, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, C, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std  # (N, C, H, W)
    gh, gw = H // ps, W // ps
    x = x.unsqueeze(1).expand(N, tp, C, H, W).reshape(N, tp, C, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(N, gh * gw, C * tp * ps * ps)
    ref = image_processor(images=list(images[:4]), return_tensors="pt")
    if H % (ps * ms) or W % (ps * ms) or not torch.allclose(ref["pixel_values"].view(4, gh * gw, -1), x[:4], atol=1e-5):
        raise ValueError("demo images must have a side that is a multiple of 28 and match the processor's patches")
    return x.contiguous(), ref["image_grid_thw"][0]


def answer_ids(processor, word: str) -> list[int]:
    digits = ", ".join(f'"{a}": 3' for a in ATTRIBUTES)
    return processor.tokenizer(f"<think>{word}</think><answer>{{{digits}}}</answer><|im_end|>").input_ids


def init_filters(model, n: int, gain: float, seed: int) -> None:
    """Start n rows of the patch embedding as random high-pass filters (a random pattern through a
    discrete Laplacian), gain x the mean row norm. A pretrained ViT's patch embedding is largely edge
    and texture filters; a random one is not, and the probe alone learns them slowly. Uses no data."""
    w = model.model.visual.patch_embed.proj.weight  # (D, C, T, 14, 14)
    r = torch.randn((n, *w.shape[1:]), generator=torch.Generator().manual_seed(seed))
    r = 4 * r - r.roll(1, -1) - r.roll(-1, -1) - r.roll(1, -2) - r.roll(-1, -2)
    with torch.no_grad():
        w[:n] = r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) * w.flatten(1).norm(dim=1).mean() * gain


def train_probe(model, demo, cfg, log=print):
    """Vision tower + probe (batch norm, linear) on its mean-pooled output -> distortion family
    (cross-entropy); the probe is discarded. Warm-up then cosine learning rate; the batch norm lets
    the probe read the tower's small differences between images from the first step."""
    vis = model.model.visual
    D = model.config.text_config.hidden_size
    head = nn.Sequential(nn.BatchNorm1d(D), nn.Linear(D, len(FAMILIES)))
    opt = torch.optim.AdamW([{"params": list(vis.parameters()), "lr": cfg.probe_vision_lr},
                             {"params": list(head.parameters()), "lr": cfg.probe_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.probe_steps)))
    train_idx, held = demo.train_idx, demo.indices(demo.heldout)
    g = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    model.train()
    for step in range(cfg.probe_steps):
        idx = train_idx[torch.randint(len(train_idx), (cfg.probe_batch,), generator=g)]
        loss = F.cross_entropy(head(pooled_features(model, demo, idx)), demo.family[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == cfg.probe_steps:
            head.eval()
            with torch.no_grad():  # held-out images are only looked at, for the log
                acc = (head(pooled_features(model, demo, held)).argmax(-1) == demo.family[held]).float().mean().item()
            head.train()
            log(f"probe step {step + 1}: loss {loss.item():.3f} held-out family accuracy {acc:.2f} ({time.perf_counter() - t:.0f}s)")


def pooled_tokens(model, demo, idx) -> tuple:
    """The vision tower's output tokens for images idx: one (tokens, D) tensor each."""
    grid = demo.grid.expand(len(idx), 3)
    return model.model.get_image_features(demo.pixels[idx].reshape(-1, demo.pixels.shape[-1]), grid, return_dict=True,
                                          **vision_indices(model.model.visual, grid)).pooler_output


_VISION_INDICES: dict = {}


def vision_indices(visual, grid) -> dict:
    """The tower's rotary positions, attention and window boundaries for images of one grid, as
    precomputed `image_*` keyword arguments. transformers rebuilds them in Python on every call
    (17% of a probe step); they are integers that depend on the grid alone, so same numbers."""
    from transformers.utils.generic import get_max_seqlen
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    key = (visual.spatial_merge_size, visual.window_size, visual.patch_size, visual.config._attn_implementation,
           tuple(grid.flatten().tolist()))  # everything the indices depend on (not id(visual): ids are reused)
    if key not in _VISION_INDICES:
        pos = get_vision_position_ids(grid, visual.spatial_merge_size)
        cu, max_len = get_vision_attention_seqlens(grid, visual.config)
        window, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        _VISION_INDICES[key] = {"image_position_ids": pos, "image_cu_seqlens": cu, "image_max_seqlen": max_len,
                                "image_window_index": window, "image_cu_window_seqlens": cu_window,
                                "image_max_window_seqlen": get_max_seqlen(cu_window, visual.config, kwarg_name="max_window_seqlen")}
    return _VISION_INDICES[key]


def pooled_features(model, demo, idx):
    return torch.stack(pooled_tokens(model, demo, idx)).mean(1)  # (n, D)


def train_format(model, processor, demo, cfg, log=print):
    """Supervised answer layout: the family word as reasoning, UNIFORM targets at the score digits."""
    tok = processor.tokenizer
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(1, 6)])
    seqs = torch.tensor([answer_ids(processor, w) for w in WORDS])  # (5 families, Tc)
    is_digit = torch.isin(seqs[0], digit_ids)
    word_pos = 1
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.format_lr)
    train_idx = demo.train_idx
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t = time.perf_counter()
    model.train()
    for step in range(cfg.format_steps):
        idx = train_idx[torch.randint(len(train_idx), (cfg.format_batch,), generator=g)]
        ids = seqs[demo.family[idx]].clone()  # (b, Tc)
        # random digits as inputs at the score positions, so every continuation after a score is seen
        ids[:, is_digit] = digit_ids[torch.randint(5, (len(idx), int(is_digit.sum())), generator=g)]
        p = demo.prompts(model, processor, idx)
        logits = model.lm_head(rollouts.completion_hidden(model, p, 1, ids, torch.ones_like(ids))).float()  # (b, Tc, V)
        logp = logits.log_softmax(-1)
        nll = -logp.gather(2, ids[..., None]).squeeze(-1)  # (b, Tc)
        uniform = -logp[:, is_digit][..., digit_ids].mean(-1)  # cross-entropy against uniform over 1-5
        fmt = nll[:, ~is_digit]
        loss = fmt.mean() + 2.0 * nll[:, word_pos].mean() + uniform.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0:
            log(f"format step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - t:.0f}s)")
    for p in model.parameters():
        p.requires_grad_(True)


def family_aux_loss(processor, demo, cfg):
    """Auxiliary perception loss during GRPO: name the family of other training images (no levels)."""
    tok = processor.tokenizer
    think = tok.convert_tokens_to_ids("<think>")
    words = torch.tensor([answer_ids(processor, w)[1] for w in WORDS])
    train_idx = demo.train_idx

    def loss(model):
        idx = train_idx[torch.randint(len(train_idx), (cfg.aux_batch,))]
        ids = torch.stack([torch.full((len(idx),), think), words[demo.family[idx]]], 1)  # (b, 2)
        p = demo.prompts(model, processor, idx)
        hidden = rollouts.completion_hidden(model, p, 1, ids, torch.ones_like(ids))
        return cfg.aux_weight * F.cross_entropy(model.lm_head(hidden[:, 1]).float(), ids[:, 1])
    return loss
