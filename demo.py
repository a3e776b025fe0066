"""The CPU demo: a tiny VLM learns to assess image quality, attribute by attribute, with GRPO.

    python demo.py --out runs/demo                 # data, warm-up, GRPO, evaluation (~4.5 min, 2 cores)
    python demo.py --ablation --out runs/demo      # overall-only reward from the same warm-up
    python demo.py --source photos                 # crops of photographs instead of procedural scenes

It writes OUT/summary.json (the figures, and which photos were trained on and held out),
OUT/learning_curve.png, OUT/heldout.jsonl and OUT/report.html (the held-out images with their answers,
report.py; report_ablation.html after --ablation), OUT/ladder/ (a held-out photo, clean and at levels
1, 3, 5 of each family, for `python mgiqa.py --model OUT/final OUT/ladder/*.png`), OUT/warmup and
OUT/final: checkpoints whose processor is saved with the demo's image size as its pixel cap, so that
mgiqa.load scales any photo to about 84 x 84 pixels and the answer keeps its layout. The scores mean
something only for 84 px crops distorted as here (README: the GPU recipe for real photos).

What it does (the recipe measured in docs/DEMO_NOTES.md; docs/METHOD.md gives the method):
1. Data shaped like KADID-10k (synth.synthesize, or synth.synthesize_photos with --source photos):
   every scene (procedural, or a crop of one of seven public-domain photographs) has a clean version
   and one version per distortion family (blur, noise, colour, subject pushed off-centre) at a graded
   level; ground truth 5 for untouched attributes, 5 - 0.8 * level for the distorted one, overall =
   the minimum. Held-out scenes are disjoint from training ones; with photos, crops of photos never
   seen in training (synth.HELDOUT_PHOTOS).
2. Model: tiny.build("demo"), a 0.7M-parameter Qwen2.5-VL (the size the recipe learned with; a step
   of B=16 x K=8 rollouts costs about 0.35-0.4 s on two cores), with rope_theta 4 so that its language
   model can tell the image tokens' positions apart (composition needs it; tiny.SIZES).
3. Warm-up (below, "warm-up"), which never sees a quality label or level (what a pretrained VLM would bring):
   a. perception: the vision tower and a probe (batch norm + linear) on its output tokens, read in
      order, learn the distortion FAMILY (clean / blurry / noisy / dull / offcentre); the probe is
      thrown away. Part of the patch embedding starts as random high-pass filters (init_filters: what
      a pretrained ViT's first layer has and a random one lacks), and the tower learns at 3e-4, the
      head at 3e-3. With one learning rate of 3e-3, a plain linear head and random filters, held-out
      family accuracy stayed at ~.45 after 1,500 steps; with these three, .81-.88 after 1,200 with
      the probe on the tokens' mean, and .91-.94 after 800-1,200 on the tokens in order, which tells
      a subject moved by one token from a centred one (measured: docs/DEMO_NOTES.md);
   b. format: supervised answers `<think>FAMILY</think><answer>{...}</answer>` whose score positions
      are pushed toward a UNIFORM distribution over the digits 1-5 (no score information at all).
4. GRPO with the multi-dimensional Thurstone reward (the language model fully fine-tuned, the vision
   tower frozen as the probe left it, so its output is computed once per image: Demo.cache_features;
   no KL term; lr 1e-3 after 20 warm-up steps, cosine to 0) and the options the recipe needs:
   attribute-specific credit, tied pairs left out, an entropy bonus on score tokens, and the
   family-word loss kept as an auxiliary loss on other images.
5. Held-out evaluation of the warm-up and final checkpoints: overall SRCC over all held-out images;
   each attribute's SRCC over the images where it varies (its family plus the clean ones).
6. --ablation: the paper's ablation, GRPO again from the same warm-up with the same settings but the
   overall-only reward (DemoConfig.weights with every attribute's weight set to 0); summary.json keeps
   both runs' settings and the paired overall SRCC difference with its bootstrap interval.

Departures (integer scores, no KL term, the options above): docs/METHOD.md, section 7, departure 9.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import grpo
import mgiqa
import report
import rollouts
import synth
from mgiqa import ATTRIBUTES

# the reasoning word of each family (None: clean)
WORD_OF = {None: "clean", "blur": "blurry", "noise": "noisy", "color": "dull", "composition": "offcentre"}
FAMILIES = (None, *mgiqa.FAMILY_TO_ATTRIBUTE)  # the probe's classes in this order


def _family_words() -> tuple[str, ...]:
    """WORD_OF of each of FAMILIES; a family without a word (a fork's new family) is named."""
    for family in FAMILIES:
        if family not in WORD_OF:
            raise ValueError(f"demo.WORD_OF has no reasoning word for the family {family!r}")
    return tuple(WORD_OF[family] for family in FAMILIES)


WORDS = _family_words()

EXTRA = ("all_images", "overall_as_attribute", "family_accuracy")  # kept in summary.json beside the five SRCCs
DEFAULT_OUT = "runs/demo"


@dataclass
class DemoConfig:
    seed: int = 0
    source: str = "procedural"      # synth.synthesize's scenes; photos: crops of assets/photos
    augment: bool = False           # training images rotated / mirrored at random (labels do not change)
    heldout_photos: str = ",".join(synth.HELDOUT_PHOTOS)  # photos source: never in training, all held-out crops
    procedural: int = 0             # photos source: procedural scenes added to training (more content to learn the families on)
    n_train: int = 15000
    n_heldout: int = 240
    per_ref: int = 5                # images per scene: clean + (per_ref - 1) family versions (9, aux weight 1.0: slower)
    image_size: int = 84
    probe_steps: int = 800          # reading the tokens in order: held-out family accuracy .90 at 500 steps, .94 at 1,200 (seed 1)
    probe_batch: int = 64
    probe_lr: float = 3e-3          # the probe head's
    probe_vision_lr: float = 3e-4   # the vision tower's (3e-3 there never got past ~45% family accuracy)
    filters: int = 32               # patch-embedding rows that start as high-pass filters (init_filters)
    filter_gain: float = 5.0
    probe_reads: str = "tokens"     # the probe's input: the tower's tokens in order (where they are), or their "mean" (seed 1: .81 held-out, off-centre 29 of 48; tokens .94, 46 of 48)
    format_steps: int = 1000        # 500: seed 3 composition .688 (level-3 off-centre images named clean); docs/DEMO_NOTES.md
    format_batch: int = 32
    format_lr: float = 1e-3
    grpo_steps: int = 400           # 450 (probe on the tokens, seeds 1, 2, 4): no figure up by more than .02 after step 375; 310 s end to end
    eval_every: int = 80
    batch_size: int = 16
    num_generations: int = 8
    lr: float = 1e-3                # peak; cosine to 0 (constant 5e-4, 450 steps: seed 1 composition .784, overall .777)
    schedule: str = "cosine"        # grpo.py's schedule after the warm-up steps (constant 1e-3 oscillated: mean .863 -> .836 in 75 steps)
    warmup_steps: int = 20          # without it, Adam's first full-size step wrecked the format (parse .70 -> .06)
    beta: float = 0.0               # no KL term: the reference's score digits are uniform by construction (0.05: seed 0 mean .873 vs .891, seed 1 .847 vs .856; 12% slower)
    gamma: float = 0.05
    entropy_coef: float = 0.2       # seed 0, step 450: 0.5 (the recipe's; aux 1.0) mean lower; 0.1 (aux 0.05) overall .791 vs .818
    # reward weights of ATTRIBUTES: all 1, each attribute's score tokens take its full advantage
    # (the computation the recipe was tuned with); reward.DEFAULT_WEIGHTS would scale them by .25
    weights: tuple = (1.0, 1.0, 1.0, 1.0, 1.0)
    aux_weight: float = 0.05        # 1.0: its gradient (norm 1-6) outweighed the policy gradient (~.55) under clip 1, learning began ~75 steps later
    aux_batch: int = 16
    max_new_tokens: int = 20
    grpo_vision: bool = False       # frozen as the probe left it (trainable, seed 0: mean .632 vs .691 with aux 1.0; at 5e-5, .841 vs .856)


class Demo:
    """The synthetic data in memory, with its pixels preprocessed once (every image has one size)."""

    def __init__(self, cfg: DemoConfig, processor, log=print):
        t = time.perf_counter()
        n = cfg.n_train + cfg.n_heldout
        make, only = ((synth.synthesize_photos, {"heldout_photos": tuple(cfg.heldout_photos.split(","))})
                      if cfg.source == "photos" else (synth.synthesize, {}))
        images, records = make(n, cfg.image_size, cfg.seed, mode="family", per_ref=cfg.per_ref,
                               heldout_frac=cfg.n_heldout / n, **only)
        if cfg.source == "photos" and cfg.procedural:  # training only: held-out crops stay photos never seen
            more, extra = synth.synthesize(cfg.procedural, cfg.image_size, cfg.seed, mode="family", per_ref=cfg.per_ref,
                                           heldout_frac=0.0, cast=True)
            images, records = np.concatenate([images, more]), records + extra
        if cfg.augment:  # each training image turned / mirrored at random: 8 views of a few photos' content
            rng = np.random.default_rng([cfg.seed, 7])
            for i in (i for i, r in enumerate(records) if r.split == "train"):
                images[i] = np.rot90(images[i][:, ::-1] if rng.random() < 0.5 else images[i], rng.integers(4))
        self.log, self.features = log, None  # features: (N, tokens, D) while the tower is frozen (cache_features)
        self.records, self.index = records, {r.image: i for i, r in enumerate(records)}
        self.family = torch.tensor([FAMILIES.index(r.family) for r in records])
        self.train = [r for r in records if r.split == "train"]
        self.heldout = [r for r in records if r.split != "train"]
        self.train_idx = self.indices(self.train)
        self.heldout_images = {r.image: images[self.index[r.image]] for r in self.heldout}  # for report.html
        self.photos = {split: sorted({r.extra["photo"] for r in recs if "photo" in r.extra})
                       for split, recs in (("train", self.train), ("heldout", self.heldout))}
        self.pixels, self.grid = patchify(images, processor.image_processor)  # (N, patches, C), (3,)
        log(f"data: {len(self.train)} train / {len(self.heldout)} held-out images of {cfg.image_size}px "
            f"in {time.perf_counter() - t:.1f}s")

    def cache_features(self, model, chunk: int = 512) -> None:
        """Run the (from now on frozen) vision tower once over every image; prompts then carry its
        output instead of pixels, so no later stage runs the tower again (same numbers)."""
        t = time.perf_counter()
        with torch.no_grad():
            self.features = torch.cat([torch.stack(pooled_tokens(model, self, torch.arange(s, min(s + chunk, len(self.pixels)))))
                                       for s in range(0, len(self.pixels), chunk)])
        self.log(f"vision features of {len(self.features)} images cached in {time.perf_counter() - t:.1f}s")

    def indices(self, records) -> torch.Tensor:
        return torch.tensor([self.index[r.image] for r in records])

    def prompts(self, model, processor, idx) -> rollouts.Prompts:
        """Encoded prompts for images idx without the processor: all prompts are identical."""
        if not hasattr(self, "_template"):  # one real encoding gives the token layout and rope positions
            from PIL import Image
            side = (int(self.grid[2]) * 14, int(self.grid[1]) * 14)
            self._template = rollouts.encode_prompts(model, processor, [Image.new("RGB", side)], mgiqa.prompt_text(processor))
        features = None if self.features is None else tuple(self.features[idx])
        return self.image_prompts(self.pixels[idx], features)

    def image_prompts(self, pixels, features) -> rollouts.Prompts:
        """Prompts for patch rows pixels (n, patches, C) of the demo's image size and the tower's
        output for them (a tuple of n, or None: the tower runs on the pixels); after prompts()."""
        t, n = self._template, len(pixels)
        return rollouts.Prompts(t.input_ids.expand(n, -1), t.attention_mask.expand(n, -1), t.positions.expand(-1, n, -1),
                                t.next_position.expand(n), pixels.reshape(-1, pixels.shape[-1]),
                                self.grid.expand(n, 3), features)


# ----------------------------------------------------------------------------- warm-up (no quality label or level)
# What a pretrained VLM would bring: perception (the vision tower and a thrown-away probe learn the
# distortion FAMILY) and the answer layout (the family word as reasoning, uniform targets at the
# score digits); also the auxiliary family loss GRPO keeps, and the fast paths (patchify, vision_indices).

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
    """The demo's answer with word as the reasoning; word is one token (position 1)."""
    digits = ", ".join(f'"{a}": 3' for a in ATTRIBUTES)
    text = f"<think>{word}</think><answer>{{{digits}}}</answer><|im_end|>"
    ids = processor.tokenizer(text).input_ids
    if ids[2] != processor.tokenizer.convert_tokens_to_ids("</think>"):
        raise ValueError(f"demo: the family word {word!r} is not one token of this tokenizer "
                         f"(the tiny models' tokenizer learns the words of tiny._tokenizer_corpus)")
    return ids


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
    """Vision tower (its patch embedding first given init_filters' high-pass rows) + probe (batch norm,
    linear) on its output tokens in order (cfg.probe_reads "tokens"; "mean": their mean) ->
    distortion family (cross-entropy); the probe is discarded.
    Warm-up then cosine learning rate; the batch norm lets the probe read the tower's small
    differences between images from the first step."""
    init_filters(model, cfg.filters, cfg.filter_gain, cfg.seed)
    vis = model.model.visual
    if cfg.probe_reads not in ("tokens", "mean"):
        raise ValueError(f"DemoConfig.probe_reads is {cfg.probe_reads!r}: 'tokens' or 'mean'")
    tokens = int(demo.grid.prod()) // vis.spatial_merge_size ** 2  # the tower's output tokens per image
    D = model.config.text_config.hidden_size * (tokens if cfg.probe_reads == "tokens" else 1)
    head = nn.Sequential(nn.BatchNorm1d(D), nn.Linear(D, len(FAMILIES)))
    read = pooled_features if cfg.probe_reads == "mean" else token_features
    opt = torch.optim.AdamW([{"params": list(vis.parameters()), "lr": cfg.probe_vision_lr},
                             {"params": list(head.parameters()), "lr": cfg.probe_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.probe_steps)))
    train_idx, held = demo.train_idx, demo.indices(demo.heldout)
    g = torch.Generator().manual_seed(cfg.seed)
    t = time.perf_counter()
    model.train()
    for step in range(cfg.probe_steps):
        idx = train_idx[torch.randint(len(train_idx), (cfg.probe_batch,), generator=g)]
        loss = F.cross_entropy(head(read(model, demo, idx)), demo.family[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == cfg.probe_steps:
            head.eval()
            with torch.no_grad():  # held-out images are only looked at, for the log
                pred = head(read(model, demo, held)).argmax(-1)
            head.train()
            acc = (pred == demo.family[held]).float().mean().item()
            log(f"probe step {step + 1}: loss {loss.item():.3f} held-out family accuracy {acc:.2f} ({time.perf_counter() - t:.0f}s)")
    if cfg.probe_steps:
        log(f"probe's held-out confusion (rows: true family, columns: predicted; {' / '.join(WORDS)}): "
            + json.dumps(confusion(demo.family[held], pred).tolist()))
    return head


def confusion(true: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """(families, families) counts: row = true family, column = predicted (FAMILIES order)."""
    out = np.zeros((len(FAMILIES), len(FAMILIES)), int)
    np.add.at(out, (true.numpy(), pred.numpy()), 1)
    return out


def pooled_tokens(model, demo, idx) -> tuple:
    """The vision tower's output tokens for images idx: one (tokens, D) tensor each."""
    return tower_tokens(model, demo.pixels[idx], demo.grid)


def tower_tokens(model, pixels, grid) -> tuple:
    """The vision tower's output tokens for patch rows pixels (n, patches, C) of one grid."""
    grids = grid.expand(len(pixels), 3)
    return model.model.get_image_features(pixels.reshape(-1, pixels.shape[-1]), grids, return_dict=True,
                                          **vision_indices(model.model.visual, grids)).pooler_output


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


def token_features(model, demo, idx):
    return torch.stack(pooled_tokens(model, demo, idx)).flatten(1)  # (n, tokens * D), in order


def answer_hidden(model, p: rollouts.Prompts, ids):
    """rollouts.hidden_plain for one answer per image, cheaper for the demo's prompts, which are
    identical up to the image and unpadded: the instruction before the image runs once for the batch
    and its KV cache (with its graph) is expanded to the rows. Same numbers (tests/test_demo.py); the
    130-token instruction would otherwise cost the warm-up several times its 20-token answers."""
    from transformers import DynamicCache

    image_token = model.config.image_token_id
    S = int((p.input_ids[0] == image_token).nonzero()[0]) - 1  # the text before <|vision_start|><|image_pad|>
    (B, Tp), T = p.input_ids.shape, ids.shape[1]
    cache = DynamicCache(config=model.config.get_text_config())
    rollouts.lm_hidden(model, p.input_ids[:1, :S], p.attention_mask[:1, :S], p.positions[:, :1, :S], None, cache)
    cache.batch_repeat_interleave(B)
    pos = torch.cat([p.positions[:, :, S:], rollouts.completion_positions(p.next_position, T)], dim=2)
    h = rollouts.lm_hidden(model, torch.cat([p.input_ids[:, S:], ids], 1), torch.cat([p.attention_mask, torch.ones_like(ids)], 1),
                           pos, rollouts.image_features(model, p), cache)
    return h[:, Tp - S - 1:Tp - S - 1 + T]


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
        logits = model.lm_head(answer_hidden(model, p, ids)).float()  # (b, Tc, V)
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
        hidden = answer_hidden(model, p, ids)
        return cfg.aux_weight * F.cross_entropy(model.lm_head(hidden[:, 1]).float(), ids[:, 1])
    return loss


# ----------------------------------------------------------------------------- held-out evaluation and GRPO

def heldout_answers(model, processor, demo: Demo, cfg: DemoConfig) -> list[str]:
    """Greedy answers on the held-out images, in demo.heldout order."""
    idx = demo.indices(demo.heldout)
    return [t for s in range(0, len(idx), 120)
            for t in greedy(model, processor, demo.prompts(model, processor, idx[s:s + 120]), cfg)]


def greedy(model, processor, p: rollouts.Prompts, cfg: DemoConfig) -> list[str]:
    """The model's greedy answers to prompts p, in eval mode."""
    model.eval()
    tokens = grpo.Tokens.resolve(grpo.Config(), model, processor)
    ids = rollouts.sample_shared(model, p, K=1, max_new_tokens=cfg.max_new_tokens, eos_ids=tokens.eos,
                                 pad_id=tokens.pad, banned=tokens.banned, temperature=0.0)
    return mgiqa.decode_completions(processor, ids, tokens.eos)


def image_answers(model, processor, demo: Demo, cfg: DemoConfig, images: np.ndarray) -> list[str]:
    """Greedy answers for uint8 images (N, S, S, 3) of the demo's size that are not in its data
    (the ladders of photos), the vision tower run on them once."""
    pixels, _ = patchify(images, processor.image_processor)
    demo.prompts(model, processor, torch.arange(1))  # the prompt template, made once
    with torch.no_grad():
        features = tower_tokens(model, pixels, demo.grid)
    return [t for s in range(0, len(pixels), 120)
            for t in greedy(model, processor, demo.image_prompts(pixels[s:s + 120], features[s:s + 120]),
                            cfg)]


LADDER_CROPS = 6  # crops of each photo whose ladders are scored (x 4 families x 6 levels)


def ladder_figures(model, processor, demo: Demo, cfg: DemoConfig, photos) -> dict:
    """SRCC within each ladder (one crop of a photo: its clean version and levels 1-5 of one family,
    where a level is comparable: the same content), averaged over the ladders of LADDER_CROPS crops
    of each photo: the family's attribute, and overall over every family's ladders. A constant
    answer on a ladder counts 0, as in the mean."""
    ladders = [(family, images) for photo in photos for k in range(LADDER_CROPS)
               for family, images in synth.photo_ladder(photo, cfg.image_size, 100 * cfg.seed + k).items()]
    stacked = np.concatenate([images for _, images in ladders])
    texts = image_answers(model, processor, demo, cfg, stacked)
    pred = np.array([[mgiqa.parse_answer(t)[a] for a in ATTRIBUTES] for t in texts])
    pred = pred.reshape(len(ladders), 6, len(ATTRIBUTES))
    truth = -np.arange(6.0)  # level 0 (clean) is the best
    per = {a: [] for a in ATTRIBUTES}
    for (family, _), p in zip(ladders, pred, strict=True):
        for a in (mgiqa.FAMILY_TO_ATTRIBUTE[family], "overall"):
            r = evaluate.srcc(p[:, ATTRIBUTES.index(a)], truth)
            per[a].append(0.0 if math.isnan(r) else float(r))
    figures = {a: float(np.mean(v)) for a, v in per.items() if v}
    return figures | {"ladders": len(ladders), "photos": list(photos)}


def ladder_panel(model, processor, demo: Demo, cfg: DemoConfig) -> dict:
    """The ladder written to OUT/ladder (ladder_photo's crop, clean and levels 1, 3, 5 of each
    family) with the model's scores: what report.html shows as transfer to unseen content."""
    images = ladder_images(demo, cfg)
    texts = image_answers(model, processor, demo, cfg, np.stack(list(images.values())))
    scores = {name: {a: mgiqa.parse_answer(t)[a] for a in ATTRIBUTES} | {"answer": t}
              for name, t in zip(images, texts, strict=True)}
    return {"photo": ladder_photo(demo), "scores": scores}


def evaluate_heldout(model, processor, demo: Demo, cfg: DemoConfig, texts: list[str] | None = None) -> dict:
    """Greedy answers on the held-out images (or texts, those answers) -> heldout_srcc, family word
    accuracy, parse rate."""
    texts = heldout_answers(model, processor, demo, cfg) if texts is None else texts
    pred = np.array([[mgiqa.parse_answer(t)[a] for a in ATTRIBUTES] for t in texts])  # (N, A)
    recs = demo.heldout
    out = heldout_srcc(pred, recs)
    words = [mgiqa.reasoning_text(t) for t in texts]
    out["family_accuracy"] = float(np.mean([w == WORDS[FAMILIES.index(r.family)] for w, r in zip(words, recs)]))
    out["parse_rate"] = float(np.mean([mgiqa.parse_answer(t, strict=True) is not None for t in texts]))
    return out


def heldout_srcc(pred: np.ndarray, recs: list) -> dict:
    """pred (N, A) scores in ATTRIBUTES order for records recs -> overall SRCC over all images; each
    attribute's SRCC within its family (evaluate.attribute_srcc_within_family: its images plus the
    clean ones); under "all_images" the attributes over all images; under "overall_as_attribute" the
    within-family SRCC that the OVERALL column earns in each attribute's place. Within one family
    the attribute and the MOS fall together, so writing the overall score in every slot earns that
    much without knowing any attribute; the all-image figures are what tell the two apart."""
    names = mgiqa.LABELLED
    rows = [{"dataset": r.dataset, "image": r.image, **dict(zip(ATTRIBUTES, p, strict=True))}
            for r, p in zip(recs, pred.tolist(), strict=True)]
    in_place = [row | dict.fromkeys(names, row["overall"]) for row in rows]
    overall = pred[:, ATTRIBUTES.index("overall")]
    out = {"overall": float(evaluate.srcc(overall, np.array([r.mos for r in recs])))}
    out |= evaluate.attribute_srcc_within_family(rows, recs)
    all_images = {a: float(evaluate.srcc(pred[:, ATTRIBUTES.index(a)], [r.attributes[a] for r in recs]))
                  for a in names}
    return out | {"all_images": all_images, "overall_as_attribute": evaluate.attribute_srcc_within_family(in_place, recs)}


def mean_srcc(m: dict) -> float:
    """"mean" wherever the demo says it (code, summary.json, README): the mean held-out SRCC of the
    five (ATTRIBUTES, overall included); a constant greedy answer (SRCC undefined, NaN) counts as 0,
    the rank correlation a constant predictor earns."""
    return float(np.mean([0.0 if math.isnan(m[a]) else m[a] for a in ATTRIBUTES]))


def overall_difference(final_rows: list, ablation_rows: list, seed: int, n: int = 1000) -> dict:
    """The paper's ablation figure: held-out overall SRCC with the attribute rewards (final_rows)
    minus without (ablation_rows), paired, with a 95% bootstrap interval over resampled held-out
    images (evaluate.compare; images either run left unparsed are dropped from both)."""
    result = evaluate.compare(final_rows, ablation_rows, attribute="overall", n=n, seed=seed)
    (name,) = [k for k in result if k != "average"]  # the demo's one dataset
    return result[name] | {"a": "final (attribute and overall rewards)",
                           "b": "ablation (overall-only reward)"}


def agrees_with_paper(difference: float) -> bool | None:
    """The paper's direction: overall SRCC drops without the attribute rewards (.798 -> .779);
    None when there is no difference to judge (a constant overall answer in either run)."""
    return None if math.isnan(difference) else difference > 0


def scores(result: dict) -> dict:
    """What summary.json keeps of a checkpoint's evaluation: the five SRCCs, their mean and EXTRA.
    The ablation's entry has no mean: its attributes were not rewarded."""
    kept = {a: result[a] for a in ATTRIBUTES} | {"mean": mean_srcc(result)}
    return kept | {k: result[k] for k in EXTRA}


def overall_only(weights) -> tuple:
    """The ablation's reward weights: the overall score's weight as given, every attribute's 0."""
    named = dict(zip(ATTRIBUTES, weights, strict=True))
    return tuple(w if a == "overall" else 0.0 for a, w in named.items())


def grpo_settings(cfg: DemoConfig, out_dir: Path, ablation: bool) -> grpo.Config:
    """The GRPO settings of the full run, or of its ablation: the same but for the reward weights,
    which are overall-only there (the credit rule, entropy bonus and auxiliary loss stay)."""
    weights = overall_only(cfg.weights) if ablation else tuple(cfg.weights)
    return grpo.Config(out=str(out_dir), seed=cfg.seed, steps=cfg.grpo_steps, full=True,
                       batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
                       num_generations=cfg.num_generations, lr=cfg.lr, schedule=cfg.schedule,
                       beta=cfg.beta, gamma=cfg.gamma, ignore_ties=True, entropy_coef=cfg.entropy_coef,
                       entropy_vocab="12345", max_new_tokens=cfg.max_new_tokens, credit="attribute",
                       weights=list(weights), save_every=100, keep=1, eval_every=cfg.eval_every,
                       model="demo")


def recorded_settings(gcfg: grpo.Config) -> dict:
    """A run's GRPO settings as summary.json keeps them: every field but its run folder."""
    return {k: v for k, v in asdict(gcfg).items() if k != "out"}


def run_grpo(model, processor, demo: Demo, cfg: DemoConfig, out_dir: Path, ablation: bool, log=print):
    """GRPO from the model as it is, in a fresh out_dir (grpo.train would resume from what is there)
    -> the held-out learning curve and the settings run."""
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None  # the KL term's reference
    model.requires_grad_(True)
    model.model.visual.requires_grad_(cfg.grpo_vision)
    if cfg.grpo_vision:
        demo.features = None  # the tower changes from here on: run it on the pixels
    shutil.rmtree(out_dir, ignore_errors=True)
    gcfg = grpo_settings(cfg, out_dir, ablation)
    sampler = data.Sampler({demo.train[0].dataset: demo.train}, cfg.batch_size, seed=cfg.seed)
    curve = []

    def eval_fn(m, step):
        result = evaluate_heldout(m, processor, demo, cfg)
        curve.append({"step": step, **{a: result[a] for a in ATTRIBUTES}})
        m.train()
        return {a: round(result[a], 3) for a in ATTRIBUTES}

    def prompts_of(records):
        return demo.prompts(model, processor, demo.indices(records))

    torch.manual_seed(cfg.seed)
    grpo.train(gcfg, model, processor, sampler, prompts_of=prompts_of, ref_model=ref,
               aux_loss=family_aux_loss(processor, demo, cfg), eval_fn=eval_fn, log=log)
    return curve, recorded_settings(gcfg)


CURVE_PALETTE = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def curve_colors() -> dict[str, str]:
    """Each attribute's curve colour: CURVE_PALETTE in ATTRIBUTES order, overall black."""
    if len(mgiqa.LABELLED) > len(CURVE_PALETTE):
        raise ValueError(f"{len(mgiqa.LABELLED)} attributes, {len(CURVE_PALETTE)} colours in "
                         "demo.CURVE_PALETTE: add colours")
    return {**dict(zip(mgiqa.LABELLED, CURVE_PALETTE)), "overall": "#000000"}


def plot_curve(curves: dict, path: Path) -> None:
    """Held-out SRCC per attribute against GRPO step, drawn with PIL (matplotlib is not required)."""
    from PIL import Image, ImageDraw

    W, H, pad = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colors = curve_colors()
    points = [p for c in curves.values() for p in c]
    if not points:
        return
    max_step = max(p["step"] for p in points) or 1
    x = lambda s: pad + (W - 2 * pad) * s / max_step  # noqa: E731
    y = lambda v: H - pad - (H - 2 * pad) * (max(-0.2, min(1.0, v)) + 0.2) / 1.2  # noqa: E731
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for v in (0.0, 0.5, 0.8, 1.0):
        d.line([pad, y(v), W - pad, y(v)], fill="#dddddd")
        d.text((5, y(v) - 6), f"{v:.1f}", fill="black")
    d.text((W // 2 - 30, H - pad + 20), "GRPO step", fill="black")
    for s in sorted({p["step"] for p in points}):
        d.text((x(s) - 8, H - pad + 4), str(s), fill="black")
    d.text((pad, 10), "held-out SRCC (attributes within their family; dashed: ablation)", fill="black")
    d.text((pad, 24), "a constant answer (SRCC undefined) is drawn at 0, as a hollow dot", fill="black")
    for (name, curve) in curves.items():
        for a, color in colors.items():
            pts = [(x(p["step"]), y(0.0 if math.isnan(p[a]) else p[a]), math.isnan(p[a])) for p in curve]
            for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
                end = ((x0 + x1) / 2, (y0 + y1) / 2) if name == "ablation" else (x1, y1)
                d.line([x0, y0, *end], fill=color, width=2)
            for px, py, constant in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=color, fill="white" if constant else color)
    for i, (a, color) in enumerate(colors.items()):
        d.text((W - pad - len(colors) * 95 + 95 * i, 36), a, fill=color)
    img.save(path)


def fit_processor(processor, side: int) -> None:
    """The image size the model learns on, kept with its processor: min and max pixels both side^2,
    so that a checkpoint scales any photo to about side x side pixels (Qwen2-VL keeps the aspect
    ratio, in 28-pixel units: 720 x 477 -> 84 x 56) and its answer keeps the learned layout."""
    processor.image_processor.size = {"shortest_edge": side * side, "longest_edge": side * side}


def ladder_photo(demo: Demo) -> str:
    """The photo whose ladder the demo writes: a held-out one, or with procedural scenes (where the
    model saw no photograph at all) synth.HELDOUT_PHOTOS' first."""
    return (demo.photos["heldout"] or list(synth.HELDOUT_PHOTOS))[0]


def ladder_images(demo: Demo, cfg: DemoConfig) -> dict:
    """{file name: uint8 image}: ladder_photo's crop (seed cfg.seed), clean and at levels 1, 3, 5
    of each family."""
    photo, out = ladder_photo(demo), {}
    for family, images in synth.photo_ladder(photo, cfg.image_size, cfg.seed).items():
        for level in (0, 1, 3, 5):
            name = f"{photo}_clean.png" if level == 0 else f"{photo}_{family}{level}.png"
            out[name] = images[level]
    return out


def write_ladder(folder: Path, demo: Demo, cfg: DemoConfig) -> None:
    """ladder_images as PNG files for mgiqa.py."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, image in ladder_images(demo, cfg).items():
        Image.fromarray(image).save(folder / name)


def heldout_rows(texts: list[str], demo: Demo) -> list[dict]:
    """evaluate.py's result rows for the greedy answers texts on the held-out images."""
    def answer(t):
        strict = mgiqa.parse_answer(t, strict=True) is not None
        return {**mgiqa.parse_answer(t), "strict": strict, "completion": t}

    return [evaluate.result_row(r, answer(t), True) for r, t in zip(demo.heldout, texts, strict=True)]


# the paper's held-out overall SRCC: MG-IQA, and MG-IQA without multi-attribute reasoning
PAPER = {"with": 0.798, "without": 0.779}


def verdict(agrees: bool | None) -> str:
    """agrees_with_paper's answer in words."""
    return {True: "agrees with", False: "does not agree with"}.get(agrees, "cannot be held against")


def within(d: dict) -> str:
    """What the interval adds to the direction: whether it holds 0."""
    return ", but its 95% interval contains 0" if d["low"] <= 0 <= d["high"] else ""


def comparison_html(summary: dict) -> str:
    """The report's opening: the paper's comparison, this run's overall SRCC with and without the
    attribute rewards (after --ablation), beside the paper's."""
    d = summary.get("ablation_overall_difference")
    head = "<h2>With and without the attribute rewards (the paper's ablation)</h2>"
    if not d:
        return (head + "<p>Held-out overall SRCC with them: "
                f"<b>{report.num(summary['final']['overall'])}</b>. Run <code>python demo.py --ablation</code> "
                "(the same GRPO from the same warm-up, overall-only reward) to compare.</p>")
    this = (f"<tr><td>this run, seed {summary['config']['seed']}, {d['n']} held-out images</td>"
            f"<td>{report.num(d['srcc_a'])}</td><td>{report.num(d['srcc_b'])}</td>"
            f"<td>{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]</td></tr>")
    paper = (f"<tr><td>the paper (held-out SRCC)</td><td>{PAPER['with']:.3f}</td>"
             f"<td>{PAPER['without']:.3f}</td><td>{PAPER['with'] - PAPER['without']:+.3f}</td></tr>")
    return (head + "<div class=scroll><table><tr><th></th><th>overall SRCC with attribute rewards</th>"
            "<th>without (overall-only reward)</th><th>difference [95% bootstrap interval]</th></tr>"
            f"{this}{paper}</table></div><p>This run {verdict(d['agrees_with_paper'])} the paper's direction{within(d)}. "
            "Everything but the reward weights was the same in the two runs (summary.json, \"settings\"); "
            "the ablation's attribute scores were not rewarded, so they are not compared.</p>")


def ladder_html(summary: dict, demo: Demo, cfg: DemoConfig) -> str:
    """The panel of the ladder of a photograph the model never trained on, with the final
    model's scores."""
    panel = summary.get("ladder")
    if not panel:
        return ""
    images = ladder_images(demo, cfg)
    seen = "trained on procedural scenes only" if cfg.source == "procedural" else "never trained on this photo"
    photo, levels = panel["photo"], (1, 3, 5)
    rows = []
    for family, attribute in mgiqa.FAMILY_TO_ATTRIBUTE.items():
        names = [f"{photo}_clean.png"] + [f"{photo}_{family}{level}.png" for level in levels]
        if names[1] not in images:  # a photo without a subject has no composition ladder
            continue
        cells = []
        for name in names:
            s = panel["scores"][name]
            src, _ = report.thumbnail(images[name])
            cells.append(f'<td><img src="{src}" alt="{report.esc(name)}"><br>'
                         f'{attribute} <b>{report.num(s[attribute], 0)}</b> · '
                         f'overall <b>{report.num(s["overall"], 0)}</b></td>')
        rows.append(f"<tr><td>{family}</td>{''.join(cells)}</tr>")
    head = "<tr><th>family</th><th>clean</th>" + "".join(f"<th>level {v}</th>" for v in levels) + "</tr>"
    figures = summary.get("ladder_srcc", {})
    within = ", ".join(f"{a} {report.num(figures[a])}" for a in ATTRIBUTES if a in figures)
    where = f"{figures.get('ladders', 0)} ladders of {', '.join(figures.get('photos', []))}"
    return (f"<h2>Transfer to content never seen: a photograph ({report.esc(photo)})</h2>"
            f"<p>The final model ({seen}) scores one crop of the photo, clean and at levels 1, 3 and 5 "
            "of each distortion family. Within such ladders (the same content at every level; "
            f"{where}) its SRCC is: {within}.</p>"
            f'<div class=scroll><table class="ladder">{head}{"".join(rows)}</table></div>')


def heldout_report(out: Path, texts: list[str], demo: Demo, name: str, title: str, preface: str = "",
                   appendix: str = "") -> None:
    """OUT/heldout[_NAME].jsonl (evaluate.py's rows) and OUT/report[_NAME].html for the held-out images."""
    rows = heldout_rows(texts, demo)
    suffix = "" if name == "final" else f"_{name}"
    with open(out / f"heldout{suffix}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(report.dumps(row) + "\n" for row in rows)
    curve = out / "learning_curve.png"
    extra = f'<h2>Learning curve</h2><img alt="held-out SRCC against GRPO step" src="data:image/png;base64,' \
            f'{base64.b64encode(curve.read_bytes()).decode()}">' if curve.is_file() else ""
    report.write_report(out / f"report{suffix}.html", rows, demo.heldout, evaluate.summarize(rows, demo.heldout), title,
                        subtitle=f"{len(rows)} held-out images of {demo.heldout_images[rows[0]['image']].shape[0]} px, "
                                 f"scenes disjoint from training; greedy answers of the {name} checkpoint, worst-ranked "
                                 "first",
                        note="The CPU demo's 0.7M-parameter model, trained on 84 px crops with one synthetic distortion "
                             "each: its scores mean something only on such images. For real photos see the README's GPU recipe.",
                        images=demo.heldout_images, preface=preface, appendix=appendix + extra)


def config(args) -> DemoConfig:
    """DemoConfig from the command line's seed and source, then the fields MGIQA_DEMO (JSON) overrides."""
    cfg = DemoConfig(seed=args.seed, source=getattr(args, "source", None) or DemoConfig.source)
    for key, value in json.loads(os.environ.get("MGIQA_DEMO", "{}")).items():
        if not hasattr(cfg, key):
            raise SystemExit(f"error: MGIQA_DEMO sets {key!r}, which is not a DemoConfig field")
        setattr(cfg, key, type(getattr(cfg, key))(value))  # reduced variants (the CI test) override fields
    return cfg


def untrained(cfg: DemoConfig, log=print):
    """The demo's model as built from its config (seed cfg.seed), its processor sized to the demo's
    images, and the data: what the warm-up starts from (main; scripts/probe.py)."""
    model, processor = mgiqa.load("demo", device="cpu", seed=cfg.seed)
    fit_processor(processor, cfg.image_size)
    rollouts.fast_vision(model)
    return model, processor, Demo(cfg, processor, log)


def main(args) -> int:
    """args: out, seed, ablation, threads (the command line's, or an argparse.Namespace with them)."""
    out = Path(getattr(args, "out", None) or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(args)
    torch.set_num_threads(getattr(args, "threads", None) or 2)

    def log(msg):
        print(msg, flush=True)
        with open(out / "demo.log", "a") as f:  # each line on disk at once: nothing lost on a crash
            f.write(msg + "\n")

    t0 = time.perf_counter()
    summary_path = out / "summary.json"
    summary = report.nan_for_null(json.loads(summary_path.read_text())) if summary_path.is_file() else {}
    model, processor, demo = untrained(cfg, log)
    warm_dir = out / "warmup"
    if args.ablation:
        if not (warm_dir / "config.json").is_file():
            raise SystemExit(f"error: {warm_dir} has no warm-up checkpoint; run `python demo.py --out {out}` first")
        if summary.get("config", {}).get("source", cfg.source) != cfg.source:
            raise SystemExit(f"error: {out} was warmed up on --source {summary['config']['source']}; pass the same --source")
        model, processor = mgiqa.load(str(warm_dir), device="cpu")
        rollouts.fast_vision(model)
        demo.cache_features(model)
        curve, settings = run_grpo(model, processor, demo, cfg, out / "ablation-run", ablation=True, log=log)
        texts = heldout_answers(model, processor, demo, cfg)
        result = evaluate_heldout(model, processor, demo, cfg, texts)
        # no mean (scores): the ablation's attributes had no reward
        summary["ablation"] = {a: result[a] for a in ATTRIBUTES} | {k: result[k] for k in EXTRA}
        summary.setdefault("settings", {})["ablation"] = settings
        final_rows = [report.nan_for_null(json.loads(line)) for line in open(out / "heldout.jsonl")]
        difference = overall_difference(final_rows, heldout_rows(texts, demo), cfg.seed)
        agrees = agrees_with_paper(difference["diff"])
        summary["ablation_overall_difference"] = difference | {"agrees_with_paper": agrees}
        summary["ablation_seconds"] = time.perf_counter() - t0
        summary.setdefault("curves", {})["ablation"] = curve
    else:
        train_probe(model, demo, cfg, log)
        demo.cache_features(model)  # the tower stays as the probe left it (unless cfg.grpo_vision)
        train_format(model, processor, demo, cfg, log)
        model.save_pretrained(warm_dir)
        processor.save_pretrained(warm_dir)
        warm = evaluate_heldout(model, processor, demo, cfg)
        log(f"warm-up done at {time.perf_counter() - t0:.0f}s: " + json.dumps({k: round(v, 3) for k, v in warm.items() if not isinstance(v, dict)}))
        curve = [{"step": 0, **{a: warm[a] for a in ATTRIBUTES}}]
        more, settings = run_grpo(model, processor, demo, cfg, out / "grpo-run", ablation=False, log=log)
        curve += more
        model.save_pretrained(out / "final")
        processor.save_pretrained(out / "final")
        texts = heldout_answers(model, processor, demo, cfg)
        final = evaluate_heldout(model, processor, demo, cfg, texts)
        write_ladder(out / "ladder", demo, cfg)
        summary["ladder"] = ladder_panel(model, processor, demo, cfg)
        unseen = demo.photos["heldout"] or synth.HELDOUT_PHOTOS
        summary["ladder_srcc"] = ladder_figures(model, processor, demo, cfg, unseen)
        summary.update({"seconds": time.perf_counter() - t0, "config": asdict(cfg), "photos": demo.photos,
                        "warmup": scores(warm), "final": scores(final),
                        "settings": {"final": settings}})
        for stale in ("ablation", "ablation_seconds", "ablation_overall_difference"):  # of an earlier warm-up
            summary.pop(stale, None)
        summary.setdefault("curves", {}).pop("ablation", None)
        summary["curves"]["final"] = curve
    report.write_json(summary_path, summary, indent=2)
    plot_curve(summary.get("curves", {}), out / "learning_curve.png")
    what = f"held-out crops of photos never seen in training ({', '.join(demo.photos['heldout'])})" \
        if cfg.source == "photos" else "held-out synthetic scenes"
    final_texts = texts if not args.ablation else [row["completion"] for row in final_rows]
    title = f"MG-IQA demo, seed {cfg.seed}: {what}"
    heldout_report(out, final_texts, demo, "final", f"{title}, final checkpoint",
                   preface=comparison_html(summary), appendix=ladder_html(summary, demo, cfg))
    if args.ablation:
        heldout_report(out, texts, demo, "ablation", f"{title}, ablation checkpoint (overall-only reward: "
                       "its attribute scores were not rewarded)")
    print_table(summary, log)
    return 0


def print_table(summary: dict, log=print) -> None:
    log("held-out SRCC; nan = no ranking: the same greedy answer for every image, or no such score "
        "(counted as 0 in the mean, the five's mean)")
    log(f"{'':14s} " + " ".join(f"{a:>12s}" for a in ATTRIBUTES) + "         mean")
    for name in ("warmup", "final"):
        if name in summary:
            m = summary[name]
            log(f"{name:14s} " + " ".join(f"{m[a]:12.3f}" for a in ATTRIBUTES) + f" {mean_srcc(m):12.3f}")
    if "ablation" in summary:  # its attributes had no reward: their figures are no comparison
        log(f"{'ablation':14s} " + " ".join(f"{'not rewarded':>12s}" for a in mgiqa.LABELLED)
            + f" {summary['ablation']['overall']:12.3f}")
    d = summary.get("ablation_overall_difference")
    if d:
        log(f"overall SRCC with - without the attribute rewards: {d['diff']:+.3f} (95% bootstrap "
            f"interval {d['low']:+.3f} to {d['high']:+.3f}, {d['n']} held-out images); "
            f"{verdict(d['agrees_with_paper'])} the paper's direction (.798 -> .779 without){within(d)}")
    log("(all): attributes over all held-out images; (ov): the overall digit in each attribute's place, within family")
    for key, tag in (("all_images", "all"), ("overall_as_attribute", "ov")):
        for name in ("warmup", "final"):
            if name in summary and key in summary[name]:
                m = summary[name][key]
                cells = " ".join(f"{m.get(a, float('nan')):12.3f}" for a in mgiqa.LABELLED)
                log(f"{name + f' ({tag})':14s} " + cells)


# ----------------------------------------------------------------------------- the step explained's model

EXPLAIN_FORMAT_STEPS = 300  # answer-layout steps: then 49 of 64 sampled answers were strict


def explain_model(seed: int = 0, format_steps: int = EXPLAIN_FORMAT_STEPS):
    """This demo's model after format_steps of its answer-layout warm-up (no probe, no quality
    label: its K answers are well formed and differ), its processor and 400 procedural scenes:
    what `python grpo.py --explain` steps from (assets/explain-model, written by write_explain_model)."""
    cfg = DemoConfig(seed=seed, n_train=400, n_heldout=8, format_steps=format_steps)
    model, processor, scenes = untrained(cfg, log=quiet)
    scenes.cache_features(model)  # the tower stays as built: its output is computed once per image
    torch.manual_seed(seed)
    train_format(model, processor, scenes, cfg, log=quiet)
    return model, processor, scenes


def write_explain_model(folder: str) -> None:
    """python demo.py --write-explain-model assets/explain-model (about 20 s)."""
    model, processor, _ = explain_model()
    model.generation_config = mgiqa.plain_generation_config(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def quiet(*args, **kwargs) -> None:
    """A log that keeps nothing."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="The CPU demo: distorted scenes, warm-up, GRPO, "
                                             "held-out evaluation and report.")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the data draw (default 0)")
    ap.add_argument("--ablation", action="store_true",
                    help="the same GRPO from OUT/warmup with the overall-only reward (run without it first); "
                         "prints the paired overall SRCC difference")
    ap.add_argument("--source", choices=("photos", "procedural"), default=DemoConfig.source,
                    help="scenes: procedural waves (default), or crops of the seven photographs in assets/photos")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    ap.add_argument("--write-explain-model", default=None, metavar="DIR",
                    help="instead: write the model `python grpo.py --explain` steps from (the "
                         "answer-layout warm-up only) to DIR, e.g. assets/explain-model")
    return ap.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.write_explain_model:
        torch.set_num_threads(ARGS.threads or 2)
        sys.exit(write_explain_model(ARGS.write_explain_model))
    sys.exit(main(ARGS))
