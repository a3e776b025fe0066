"""GRPO for MG-IQA, written by hand: rollouts, log-probs, the loss, LoRA, checkpoints, the loop.

SPEC section 3 (GRPO as VisualQuality-R1 / TRL 0.16) with the reward of section 2 (reward.py) and
the one-dataset batches of section 4 (data.py).

    python grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --data kadid=/data/kadid10k koniq=/data/koniq10k \
        --out runs/mgiqa --steps 2000                               # LoRA on one GPU
    torchrun --nproc_per_node 8 grpo.py --model ... --data ... --out runs/mgiqa     # DDP, one batch per rank
    python grpo.py --demo --out runs/demo                           # the CPU demo (demo.py)
    python grpo.py --resume runs/mgiqa                              # continue exactly where it stopped

One step (rows image-major: the K rollouts of image i are rows i*K .. i*K+K-1):
  sampler -> B images of one dataset with per-attribute preferences P, M [A, B, B]
  -> K completions per image (the prompt is prefilled once per image, its KV cache expanded K times)
  -> reward.mg_reward -> advantages -> per-token clipped surrogate + beta * k3 -> AdamW.

Departures from VisualQuality-R1 (each off by default unless stated):
1. LoRA by default (VisualQuality-R1 fine-tunes all weights; `--full` does that), reference policy =
   the same model with adapters disabled, LoRA dropout 0 (so rho = 1 exactly with one iteration).
2. Rollouts and the training forward share the prompt: the vision tower and the prompt prefill run
   once per image, not K times (the same numbers as repeating; `--straightforward` repeats).
3. `--credit attribute`: each attribute's score tokens take that attribute's own group advantage,
   every other token the unnormalised format advantage F - mean_k F (default `sequence`: one
   advantage per completion, as VisualQuality-R1).
4. `--ignore-ties`: tied-label pairs left out of the fidelity mean (default: counted at P = 0.5).
5. `--entropy-coef`: an entropy bonus on the score tokens (default 0), the entropy of their
   distribution renormalised over the digit tokens (`--entropy-vocab`; the demo uses 1-5: over all
   digits, or the full vocabulary, it pushed mass onto invalid scores and broke the format).
6. An auxiliary perception loss hook (`train(..., aux_loss=...)`), used by the demo only; it never
   sees quality labels or levels.
7. Special tokens (<|image_pad|> ...) are masked out of sampling and of the training log-softmax.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mgiqa
from mgiqa import ATTRIBUTES

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- LoRA (no peft)

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x); A ~ Kaiming-uniform, B = 0, so a new adapter is a no-op."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            out = out + self.dropout(x) @ self.lora_A.t() @ self.lora_B.t() * self.scale
        return out


def add_lora(model, rank=64, alpha=128, dropout=0.0, targets=LM_TARGETS, vision=False) -> list[str]:
    """Wrap the language model's (and optionally the vision tower's) projections; freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        in_vision = ".visual." in f".{name}."
        wanted = (leaf in VISION_TARGETS and in_vision and vision) or (leaf in targets and not in_vision)
        if isinstance(module, nn.Linear) and wanted:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear matched the LoRA targets {targets}")
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference policy: the same weights with every adapter switched off (no second copy)."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names: base_model.model.<module>.lora_A.weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    return out


def save_adapter(model, out_dir, rank, alpha, dropout, base_model_name="") -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": names, "bias": "none", "base_model_name_or_path": base_model_name,
              "fan_in_fan_out": False, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(lora_state_dict(model), str(out_dir / "adapter_model.safetensors"))


def load_adapter_weights(model, adapter_dir) -> None:
    """Load a PEFT-layout adapter into a model that add_lora already wrapped."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
                m.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])


def merge_lora(model):
    """Fold every adapter into its base weight and unwrap: a plain transformers model again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight += (m.lora_B @ m.lora_A * m.scale).to(m.base.weight.dtype)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], m.base)
    return model


# ----------------------------------------------------------------------------- model plumbing

@dataclass
class Prompts:
    """B encoded prompts, one image each, left padded."""
    input_ids: torch.Tensor       # (B, Tp)
    attention_mask: torch.Tensor  # (B, Tp)
    positions: torch.Tensor       # (3, B, Tp) multimodal rope positions, as the model computes them
    next_position: torch.Tensor   # (B,) the position of the first completion token
    pixel_values: torch.Tensor    # (sum of patches, C)
    image_grid_thw: torch.Tensor  # (B, 3)
    shared: int = 0               # leading tokens identical in every row (the instruction): prefilled once
    features: tuple | None = None  # per image, the vision tower's output computed beforehand (a frozen
                                   # tower, e.g. the demo's): used instead of running the tower on the pixels


def encode_prompts(model, processor, images, thinking=True) -> Prompts:
    device = next(model.parameters()).device
    text = mgiqa.prompt_text(processor, thinking)
    enc = processor(text=[text] * len(images), images=[mgiqa.load_image(im) for im in images],
                    padding=True, return_tensors="pt").to(device)
    ids, attn, types, shared = _pad_after_shared_text(enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"])
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=enc["image_grid_thw"],
                                              attention_mask=attn)
    return Prompts(ids, attn, positions, positions.amax(dim=(0, 2)) + 1, enc["pixel_values"], enc["image_grid_thw"], shared)


def _pad_after_shared_text(ids, attn, types):
    """Move each row's left padding to just after the text all rows share (the instruction comes
    before the image), so that text is one identical prefix: computed once, not once per row.
    The attention mask and rope positions skip padding wherever it sits, so the numbers are the same."""
    rows = [r[m.bool()] for r, m in zip(ids, attn)]
    kinds = [t[m.bool()] for t, m in zip(types, attn)]
    n = min(len(r) for r in rows)
    same = torch.stack([r[:n] == rows[0][:n] for r in rows]).all(0) & (kinds[0][:n] == 0)
    shared = int(n if bool(same.all()) else same.long().argmin())
    shared = min(shared, n - 1)  # keep at least one token per row after the prefix
    T = ids.shape[1]
    new_ids, new_attn, new_types = torch.zeros_like(ids), torch.zeros_like(attn), torch.zeros_like(types)
    for b, (r, k) in enumerate(zip(rows, kinds)):
        pad = T - len(r)
        new_ids[b] = torch.cat([r[:shared], ids[b, :pad], r[shared:]])  # pad ids kept as they were
        new_attn[b] = torch.cat([torch.ones(shared, dtype=attn.dtype), torch.zeros(pad, dtype=attn.dtype),
                                 torch.ones(len(r) - shared, dtype=attn.dtype)])
        new_types[b] = torch.cat([k[:shared], types[b, :pad], k[shared:]])
    return new_ids, new_attn, new_types, shared


def repeat_prompts(p: Prompts, K: int) -> Prompts:
    """The straightforward layout: every prompt (and its image's pixel rows) repeated K times."""
    patches = p.image_grid_thw.prod(-1).tolist()
    blocks = torch.split(p.pixel_values, patches)
    pixels = torch.cat([b for b in blocks for _ in range(K)])
    features = None if p.features is None else tuple(f for f in p.features for _ in range(K))
    return Prompts(p.input_ids.repeat_interleave(K, 0), p.attention_mask.repeat_interleave(K, 0),
                   p.positions.repeat_interleave(K, 1), p.next_position.repeat_interleave(K, 0),
                   pixels, p.image_grid_thw.repeat_interleave(K, 0), p.shared, features)


def image_features(model, p: Prompts):
    """One vision-tower pass; returns the encoder output whose pooler_output holds one block per image."""
    if p.features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=p.features)
    return model.model.get_image_features(p.pixel_values, p.image_grid_thw, return_dict=True)


def expand_features(features, K: int):
    """Each image's features referenced K times (gradients from all K rows add up in the tower)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tuple(f for f in features.pooler_output for _ in range(K)))


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.model.language_model.modules())


def _varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """Vision attention over many images in one call: (1, H, S, d) split by cu_seq_lens into
    independent sequences. Equal lengths (same-size images) -> one batched sdpa; otherwise a
    block-diagonal mask. transformers' own non-flash path loops over the images one by one."""
    _, H, S, d = query.shape
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(set(lengths)) == 1:
        n, L = len(lengths), lengths[0]
        q, k, v = (t.view(H, n, L, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # (n, H, L, d)
        return out.permute(0, 2, 1, 3).reshape(1, S, H, d), None
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), torch.as_tensor(lengths, device=query.device))
    mask = seq[:, None] == seq[None, :]  # (S, S) block diagonal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)  # (1, H, S, d)
    return out.transpose(1, 2), None


def fast_vision(model) -> None:
    """Same numbers, less CPU time: batched vision attention (above) and the patch embedding's
    Conv3d, whose kernel equals its stride, run as the equivalent matrix product."""
    import types
    from transformers import AttentionInterface

    visual = getattr(model.model, "visual", None)
    if visual is None or visual.config._attn_implementation not in ("sdpa", "eager", None):
        return
    AttentionInterface.register("flash_varlen_sdpa", _varlen_sdpa)  # "flash" in the name: Qwen passes cu_seqlens
    visual.config._attn_implementation = "flash_varlen_sdpa"
    embed = visual.patch_embed
    if isinstance(getattr(embed, "proj", None), nn.Conv3d) and embed.proj.bias is None:
        def forward(self, x):
            w = self.proj.weight
            return F.linear(x.view(-1, w[0].numel()).to(w.dtype), w.view(w.shape[0], -1))
        embed.forward = types.MethodType(forward, embed)


def prefill(model, p: Prompts, features, cache):
    """Run the prompts into `cache`; returns the last prompt position's hidden state (B, D).
    The shared instruction runs once (1 row) and its KV is expanded to the B rows."""
    B, L = p.input_ids.shape[0], p.shared
    if L > 0:
        lm_hidden(model, p.input_ids[:1, :L], p.attention_mask[:1, :L], p.positions[:, :1, :L], None, cache)
        cache.batch_repeat_interleave(B)
    return lm_hidden(model, p.input_ids[:, L:], p.attention_mask, p.positions[:, :, L:], features, cache)[:, -1]


def lm_hidden(model, input_ids, attention_mask, positions, features=None, cache=None):
    """Last hidden states (R, T, D) of the language model, image features scattered in."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      mm_encoder_outputs={"image": features} if features is not None else None,
                      cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


def token_logprobs(lm_head, hidden, targets, temperature=1.0, banned=(), chunk=4096, entropy=False):
    """log pi(target) from hidden states (R, T, D) in chunks of positions, so memory never holds
    (all tokens x V) logits; banned token logits are masked before any exp (as in sampling)."""
    R, T, D = hidden.shape
    flat_h, flat_t = hidden.reshape(R * T, D), targets.reshape(R * T)
    logps, ents = [], []
    for s in range(0, R * T, chunk):
        args = (lm_head, flat_h[s:s + chunk], flat_t[s:s + chunk], temperature, banned, entropy)
        # under autograd each chunk's (chunk, V) float logits would be kept for backward, so memory
        # would grow with all tokens x V after all: recompute them in backward instead
        lp, ent = (torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() and R * T > chunk else _chunk_logprobs(*args))
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(R, T)
    return (logp, torch.cat(ents).view(R, T)) if entropy is not False and entropy is not None else logp


def _chunk_logprobs(lm_head, h, targets, temperature, banned, entropy):
    logits = lm_head(h).float() / temperature  # (chunk, V)
    if len(banned):
        logits[:, list(banned)] = torch.finfo(logits.dtype).min
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - logz
    if entropy is False or entropy is None:
        return logp, None
    if entropy is not True:  # a list of token ids: the entropy of the distribution renormalised over them
        logits = logits[:, list(entropy)]
        logz = torch.logsumexp(logits, dim=-1)
    logp_all = logits - logz[:, None]
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def completion_mask(ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after (the EOS keeps its gradient even if pad == eos)."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


# ----------------------------------------------------------------------------- rollouts

def sample_tokens(logits, temperature, top_p, generator=None):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    # inverse-CDF sampling, one uniform per row (torch.multinomial draws one per row and token);
    # u in (0, total]: the first index whose cumulative sum reaches u always has probability > 0
    cdf = probs.cumsum(-1)
    u = (1 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1)


@torch.no_grad()
def rollout(model, p: Prompts, K, max_new_tokens, eos_ids, pad_id, banned=(), temperature=1.0, top_p=None,
            shared_prefix=True, force_length=False):
    """K sampled completions per prompt, (B*K, Tc) token ids, image-major rows.

    shared_prefix: one vision pass and one prefill per image, the KV cache expanded K times.
    Otherwise the straightforward reference: B*K rows prefilled from scratch."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    if shared_prefix:
        last = prefill(model, p, image_features(model, p), cache).repeat_interleave(K, 0)
        cache.batch_repeat_interleave(K)
        attn, nxt = p.attention_mask.repeat_interleave(K, 0), p.next_position.repeat_interleave(K)
    else:
        r = repeat_prompts(p, K)
        last = lm_hidden(model, r.input_ids, r.attention_mask, r.positions, image_features(model, r), cache)[:, -1]
        attn, nxt = r.attention_mask, r.next_position
    R = last.shape[0]
    eos = torch.as_tensor(list(eos_ids), device=last.device)
    finished = torch.zeros(R, dtype=torch.bool, device=last.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = model.lm_head(last).float()  # (R, V)
        masked = list(banned) + (list(eos_ids) if force_length else [])
        if masked:
            logits[:, masked] = -float("inf")
        token = sample_tokens(logits, temperature, top_p) if temperature > 0 else logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = (nxt + t).view(1, R, 1).expand(3, R, 1)
        last = lm_hidden(model, token[:, None], attn, pos, None, cache)[:, -1]
    return torch.stack(tokens, dim=1)


def completion_logprobs(model, p: Prompts, K, ids, mask, temperature=1.0, banned=(), shared_prefix=True,
                        features=None, entropy=False):
    """Per-token log-probs (B*K, Tc) of the completions under the model, prompt and image included."""
    hidden = completion_hidden(model, p, K, ids, mask, shared_prefix, features)
    return token_logprobs(model.lm_head, hidden, ids, temperature, banned, entropy=entropy)


def completion_hidden(model, p: Prompts, K, ids, mask, shared_prefix=True, features=None):
    """(B*K, Tc, D) hidden states whose LM-head output predicts completion token t at position t.

    shared_prefix: the prompt (and vision tower) runs once per image and its KV cache, with its
    graph, is expanded to the K rows; only completion positions reach the LM head."""
    from transformers import DynamicCache

    B, Tc = p.input_ids.shape[0], ids.shape[1]
    offsets = torch.arange(Tc, device=ids.device)
    if shared_prefix and torch.is_grad_enabled() and model.training and _checkpointing(model):
        # HF's gradient checkpointing drops the KV cache inside checkpointed decoder layers while
        # grad is on (transformers/modeling_layers.py), so the completion rows would not see the
        # prompt: repeat the prompt rows instead, keeping one vision pass per image.
        features, shared_prefix = (features if features is not None else image_features(model, p)), False
    if shared_prefix:
        feats = features if features is not None else image_features(model, p)
        cache = DynamicCache(config=model.config.get_text_config())
        last = prefill(model, p, feats, cache)  # (B, D)
        cache.batch_repeat_interleave(K)
        attn = torch.cat([p.attention_mask.repeat_interleave(K, 0), mask], dim=1)
        pos = (p.next_position.repeat_interleave(K)[:, None] + offsets).unsqueeze(0).expand(3, -1, -1)
        hc = lm_hidden(model, ids, attn, pos, None, cache)  # (B*K, Tc, D)
        hidden = torch.cat([last[:, None].repeat_interleave(K, 0), hc[:, :-1]], dim=1)  # position t predicts token t
    else:
        r = repeat_prompts(p, K)
        feats = expand_features(features, K) if features is not None else image_features(model, r)
        Tp = r.input_ids.shape[1]
        pos = torch.cat([r.positions, (r.next_position[:, None] + offsets).unsqueeze(0).expand(3, -1, -1)], dim=2)
        h = lm_hidden(model, torch.cat([r.input_ids, ids], 1), torch.cat([r.attention_mask, mask], 1), pos, feats)
        hidden = h[:, Tp - 1:Tp - 1 + Tc]
    return hidden


# ----------------------------------------------------------------------------- the loss, one formula each

def k3_kl(logp, ref_logp):
    """k3 estimator of KL(pi || ref), >= 0 (Schulman, "Approximating KL divergence"; TRL, tiny-grpo)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low=0.2, eps_high=0.2):
    """-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) per token; also which tokens were clipped."""
    rho = torch.exp(logp - old_logp)
    unclipped, clipped = rho * advantages, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def aggregate(per_token, mask, mode="grpo", max_len=None):
    """grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all tokens of
    the batch; dr_grpo: sum over tokens / (rows * max completion length)."""
    mask = mask.to(per_token.dtype)
    if mode == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if mode == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r} (grpo, bnpo, dr_grpo)")


def score_token_attributes(tokenizer, ids, mask) -> torch.Tensor:
    """(R, Tc) index into ATTRIBUTES of the attribute whose score each token writes, -1 elsewhere."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    pattern = re.compile(r'"?(' + "|".join(ATTRIBUTES) + r')"?\s*[:=]\s*"?([-+]?\d*\.?\d+)')
    for r, (row, m) in enumerate(zip(ids.tolist(), mask.tolist())):
        pieces = [tokenizer.decode([t]) if keep else "" for t, keep in zip(row, m)]
        ends = np.cumsum([len(s) for s in pieces])
        text = "".join(pieces)
        start = text.rfind("<answer>")
        for match in pattern.finditer(text, max(start, 0)):
            a = ATTRIBUTES.index(match.group(1))
            lo, hi = match.span(2)
            first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi - 1, side="right"))
            out[r, first:last + 1] = a
    return out.to(ids.device)


def token_advantages(rewards: dict, attr_tokens, credit="sequence", weights=None) -> torch.Tensor:
    """(R, Tc) advantage per token. sequence: the group advantage of the total reward on every
    token (VisualQuality-R1). attribute: attribute a's score tokens take a's own group advantage,
    every other token the unnormalised format advantage (a tiny batch std made it explode)."""
    from reward import group_advantages

    B, K = rewards["total"].shape
    Tc = attr_tokens.shape[1]
    if credit == "sequence":
        return group_advantages(rewards["total"]).reshape(B * K, 1).expand(B * K, Tc)
    if credit != "attribute":
        raise ValueError(f"unknown credit {credit!r} (sequence, attribute)")
    fmt = rewards["format"]
    fmt_adv = (fmt - fmt.mean(1, keepdim=True)).reshape(B * K, 1)
    per_attr = torch.stack([group_advantages(rewards["per_attribute"][:, :, a]) for a in range(len(ATTRIBUTES))], -1)
    per_attr = per_attr.reshape(B * K, 1, len(ATTRIBUTES)).expand(B * K, Tc, len(ATTRIBUTES))
    idx = attr_tokens.clamp(min=0).unsqueeze(-1)
    return torch.where(attr_tokens >= 0, per_attr.gather(2, idx).squeeze(-1), fmt_adv.expand(B * K, Tc))


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, step, model, optimizer, scheduler, sampler, cfg, keep=2) -> Path:
    """checkpoint-STEP/ written under a temporary name, then renamed: a crash mid-write leaves the
    previous checkpoint intact and the partial one ignored."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg["full"]:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    else:
        save_adapter(model, tmp / "adapter", cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["model"])
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "sampler": sampler.state_dict(), "config": cfg}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(checkpoints(run_dir))[:-keep]:
        shutil.rmtree(run_dir / f"checkpoint-{old}", ignore_errors=True)
    return final


def checkpoints(run_dir) -> list[int]:
    """Steps of the complete checkpoints in a run directory (partial *.tmp ones are ignored)."""
    return sorted(int(m.group(1)) for d in Path(run_dir).glob("checkpoint-*")
                  if (m := re.fullmatch(r"checkpoint-(\d+)", d.name)) and (d / "trainer_state.pt").is_file())


def load_checkpoint(path, model, optimizer, scheduler, sampler) -> int:
    from safetensors.torch import load_file

    path = Path(path)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if (path / "trainable.safetensors").is_file():
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
    else:
        load_adapter_weights(model, path / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


# ----------------------------------------------------------------------------- the loop

DEFAULTS = dict(  # SPEC 3 / VisualQuality-R1 unless noted
    model="tiny", data=[], out="runs/mgiqa", seed=0, steps=1000, batch_size=8, num_generations=6, alpha=0.5,
    temperature=1.0, top_p=1.0, max_new_tokens=256, thinking=True, full=False, lora_rank=64, lora_alpha=128,
    lora_dropout=0.0, lora_vision=False, lr=1e-6, weight_decay=0.0, warmup_steps=0, schedule="constant",
    grad_clip=1.0, micro_batch=0, beta=0.04, epsilon=0.2, epsilon_high=0.2, loss_type="grpo", num_iterations=1,
    w_format=1.0, weights=None, gamma=1e-6, ignore_ties=False, credit="sequence", entropy_coef=0.0, entropy_vocab="0123456789",
    straightforward=False, save_every=100, keep=2, eval_every=0, eval_limit=200, gradient_checkpointing=False,
    dtype="auto", device="auto", max_pixels=None, force_length=False)


def lr_lambda(cfg):
    def f(step):
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        if cfg["schedule"] == "cosine":
            progress = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def select(p: Prompts, idx: list[int]) -> Prompts:
    """The prompts of some images (idx), with their pixel rows."""
    blocks = torch.split(p.pixel_values, p.image_grid_thw.prod(-1).tolist())
    return Prompts(p.input_ids[idx], p.attention_mask[idx], p.positions[:, idx], p.next_position[idx],
                   torch.cat([blocks[i] for i in idx]), p.image_grid_thw[idx], p.shared,
                   None if p.features is None else tuple(p.features[i] for i in idx))


class PolicyLogprobs(nn.Module):
    """completion_logprobs as a module, so DistributedDataParallel can wrap it and sync gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return completion_logprobs(self.model, *args, **kwargs)


def within_batch_srcc(scores, labels) -> list[float]:
    """Spearman correlation, per attribute, of the mean rollout score (B, K, A) against the batch
    labels (B, A); NaN where fewer than 3 images have both, or either side is constant."""
    import evaluate

    out = []
    for a in range(len(ATTRIBUTES)):
        s, y = scores[:, :, a].numpy(), labels[:, a].numpy()
        valid = ~np.isnan(s)
        x = np.where(valid.any(1), np.where(valid, s, 0).sum(1) / np.maximum(valid.sum(1), 1), np.nan)
        ok = ~(np.isnan(x) | np.isnan(y))
        out.append(float(evaluate.srcc(x[ok], y[ok])) if ok.sum() >= 3 else float("nan"))  # ties as scipy
    return out


def grpo_step(cfg, model, processor, policy, batch, images, ref_model=None, aux_loss=None, optimizer=None):
    """One GRPO step on one batch; returns the logged figures. Gradients are applied by the caller."""
    from reward import mg_reward

    B, K = (images.input_ids.shape[0] if isinstance(images, Prompts) else len(images)), cfg["num_generations"]
    eos, banned, pad = mgiqa.eos_ids(model, processor), mgiqa.banned_token_ids(processor), processor.tokenizer.pad_token_id
    shared = not cfg["straightforward"]
    t0 = time.perf_counter()
    model.eval()
    p = images if isinstance(images, Prompts) else encode_prompts(model, processor, images, cfg["thinking"])
    ids = rollout(model, p, K, cfg["max_new_tokens"], eos, pad, banned, cfg["temperature"], cfg["top_p"],
                  shared_prefix=shared, force_length=cfg["force_length"])  # (B*K, Tc)
    mask = completion_mask(ids, eos)
    completions = mgiqa.decode_completions(processor, ids, eos)
    t1 = time.perf_counter()
    rewards = mg_reward(completions, batch["P"], batch["M"], cfg["weights"], cfg["w_format"], cfg["thinking"],
                        cfg["gamma"], cfg["ignore_ties"])
    need_tokens = cfg["credit"] == "attribute" or cfg["entropy_coef"] > 0
    # the entropy bonus acts on the score's own vocabulary (the digits): over the full vocabulary it
    # pushed probability off the digits and broke the answer format within a few steps
    score_vocab = [i for i in processor.tokenizer.convert_tokens_to_ids(list(cfg["entropy_vocab"]))
                   if i is not None and i != processor.tokenizer.unk_token_id] if cfg["entropy_coef"] > 0 else False
    attr_tokens = score_token_attributes(processor.tokenizer, ids, mask) if need_tokens else torch.full_like(ids, -1)
    adv = token_advantages(rewards, attr_tokens, cfg["credit"])  # (B*K, Tc)
    t2 = time.perf_counter()

    model.train()
    micro = cfg["micro_batch"] or B  # images per micro-batch; its K rows go together
    groups = [list(range(s, min(B, s + micro))) for s in range(0, B, micro)]
    rows_of = lambda g: [i * K + k for i in g for k in range(K)]  # noqa: E731

    def logprobs(m, g, entropy=False):
        return completion_logprobs(m, select(p, g), K, ids[rows_of(g)], mask[rows_of(g)], cfg["temperature"],
                                   banned, shared, entropy=entropy)

    with torch.no_grad():
        ref = None
        if cfg["beta"] > 0:
            if ref_model is not None:
                ref = torch.cat([logprobs(ref_model, g) for g in groups])
            else:
                with adapters_disabled(model):
                    ref = torch.cat([logprobs(model, g) for g in groups])
        old = torch.cat([logprobs(model, g) for g in groups]) if cfg["num_iterations"] > 1 else None
    stats = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0}
    for _ in range(cfg["num_iterations"]):
        optimizer.zero_grad(set_to_none=True)
        for gi, g in enumerate(groups):
            rows, weight = rows_of(g), len(g) / B
            sync = contextlib.nullcontext() if gi == len(groups) - 1 or not hasattr(policy, "no_sync") else policy.no_sync()
            with sync:
                out = policy(select(p, g), K, ids[rows], mask[rows], cfg["temperature"], banned, shared,
                             entropy=score_vocab)
                logp, ent = out if cfg["entropy_coef"] > 0 else (out, None)
                old_logp = old[rows] if old is not None else logp.detach()
                per_token, clipped = clipped_surrogate(logp, old_logp, adv[rows], cfg["epsilon"], cfg["epsilon_high"])
                kl = k3_kl(logp, ref[rows]) if ref is not None else torch.zeros_like(logp)
                per_token = per_token + cfg["beta"] * kl  # k3 added after clipping, as TRL
                loss = aggregate(per_token, mask[rows], cfg["loss_type"], cfg["max_new_tokens"]) * weight
                if ent is not None:
                    score_pos = (attr_tokens[rows] >= 0).float()
                    bonus = (ent * score_pos).sum() / score_pos.sum().clamp(min=1)
                    loss = loss - cfg["entropy_coef"] * bonus * weight
                    stats["entropy"] += bonus.item() * weight
                loss.backward()
            m = mask[rows].float()
            stats["loss"] += loss.item()
            stats["kl"] += ((kl * m).sum() / m.sum().clamp(min=1)).item() * weight
            stats["clip"] += ((clipped.float() * m).sum() / m.sum().clamp(min=1)).item() * weight
        if aux_loss is not None:
            aux = aux_loss(model)
            aux.backward()
            stats["aux"] = aux.item()
        params = [q for q in model.parameters() if q.requires_grad]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]))
        optimizer.step()
    t3 = time.perf_counter()
    srcc = within_batch_srcc(rewards["scores"], batch["labels"]) if "labels" in batch else [float("nan")] * len(ATTRIBUTES)
    return {"reward": rewards["total"].mean().item(),
            "reward_attr": rewards["per_attribute"].mean((0, 1)).tolist(),
            "format": rewards["format"].mean().item(), "srcc": srcc,
            "length": mask.sum(1).float().mean().item(), **stats,
            "gen_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "completions": completions[:2]}


def format_line(step, s) -> str:
    attrs = " ".join(f"{a[:4]} {r:.3f}" for a, r in zip(ATTRIBUTES, s["reward_attr"]))
    srcc = " ".join(f"{x:+.2f}" for x in s["srcc"])
    return (f"step {step:5d} | reward {s['reward']:.3f} ({attrs}) | format {s['format']:.2f} | srcc {srcc} | "
            f"kl {s['kl']:.4f} clip {s['clip']:.3f} | len {s['length']:.1f} | "
            f"gen {s['gen_s']:.2f}s reward {s['reward_s']:.2f}s update {s['update_s']:.2f}s")


def train(cfg, model, processor, sampler, images_of=None, ref_model=None, aux_loss=None, eval_fn=None, log=print):
    """The loop: resume from the newest checkpoint in cfg["out"] if there is one, then step until
    cfg["steps"], checkpointing every cfg["save_every"] steps. Returns the list of logged steps.

    images_of(records) -> images (paths or PIL) or already encoded Prompts; eval_fn(model, step) -> dict of held-out figures."""
    import torch.distributed as dist

    run_dir = Path(cfg["out"])
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    policy = PolicyLogprobs(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel
        policy = DistributedDataParallel(policy, device_ids=[model.device.index] if model.device.type == "cuda" else None)
    step = 0
    if checkpoints(run_dir):
        latest = run_dir / f"checkpoint-{checkpoints(run_dir)[-1]}"
        step = load_checkpoint(latest, model, optimizer, scheduler, sampler)
        if distributed:  # each rank continues its own stream
            torch.manual_seed(cfg["seed"] * 1000 + rank + step)
        if rank == 0:
            log(f"resumed from {latest} at step {step}")
            _truncate_log(run_dir / "log.jsonl", step)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    images_of = images_of or (lambda records: [r.image for r in records])
    history = []
    while step < cfg["steps"]:
        batch = sampler.sample()
        stats = grpo_step(cfg, model, processor, policy, batch, images_of(batch["records"]), ref_model, aux_loss, optimizer)
        scheduler.step()
        step += 1
        stats.update(step=step, dataset=batch["dataset"], lr=scheduler.get_last_lr()[0])
        if eval_fn is not None and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
            stats["eval"] = eval_fn(model, step)
        if rank == 0:
            log(format_line(step, stats) + (f" | eval {json.dumps(stats['eval'])}" if "eval" in stats else ""))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(stats) + "\n")
            if cfg["save_every"] and (step % cfg["save_every"] == 0 or step == cfg["steps"]):
                save_checkpoint(run_dir, step, model, optimizer, scheduler, sampler, cfg, cfg["keep"])
        history.append(stats)
    return history


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after the checkpoint we resume from, so no step is logged twice."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def build_model(cfg):
    """(model, processor, reference model or None) as cfg asks: LoRA-wrapped, or fully trainable
    with a frozen copy as reference (none when beta = 0)."""
    import copy

    if cfg["model"] in mgiqa.SIZES:
        model, processor = mgiqa.tiny_vlm(cfg["seed"], cfg["model"])
        model = model.to(mgiqa._resolve_device(cfg["device"]))
    else:
        model, processor = mgiqa.load(cfg["model"], cfg["device"], cfg["dtype"], max_pixels=cfg["max_pixels"])
    fast_vision(model)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True
    ref = None
    if cfg["full"]:
        if cfg["beta"] > 0:
            ref = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], vision=cfg["lora_vision"])
    return model, processor, ref


def load_data(cfg, rank=0):
    """Training and held-out records from --data NAME=ROOT; the split is written to the run dir."""
    import data

    train_sets, heldout = {}, []
    for spec in cfg["data"]:
        if "=" not in spec:
            raise ValueError(f"--data takes NAME=ROOT, got {spec!r}")
        name, root = spec.split("=", 1)
        records = data.split_records(data.load_dataset(name, root), seed=cfg["seed"])
        split_path = Path(cfg["out"]) / f"split-{name}.csv"
        if split_path.is_file():  # a resumed or evaluated run keeps its images
            records = data.apply_split(records, data.load_split(str(split_path)))
        elif rank == 0:
            split_path.parent.mkdir(parents=True, exist_ok=True)
            data.save_split(records, str(split_path))
        train_sets[name] = [r for r in records if r.split == "train"]
        heldout += [r for r in records if r.split in ("val", "test")]
    return train_sets, heldout


def save_merged(model, processor, out) -> None:
    """A plain transformers checkpoint (adapters folded in) that mgiqa.load and from_pretrained open."""
    merge_lora(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def parse_args(argv=None):
    d = DEFAULTS
    ap = argparse.ArgumentParser(description="GRPO with the multi-dimensional Thurstone reward (MG-IQA).")
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=d["model"], help="checkpoint folder or hub id; 'tiny' / 'small' for tiny_vlm")
    g.add_argument("--full", action="store_true", help="fine-tune all weights (frozen reference copy) instead of LoRA")
    g.add_argument("--lora-rank", type=int, default=d["lora_rank"])
    g.add_argument("--lora-alpha", type=float, default=d["lora_alpha"])
    g.add_argument("--lora-dropout", type=float, default=d["lora_dropout"])
    g.add_argument("--lora-vision", action="store_true", help="also put adapters on the vision tower")
    g.add_argument("--dtype", default=d["dtype"], help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=d["device"])
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--max-pixels", type=int, default=d["max_pixels"], help="cap on image pixels for the processor")
    g = ap.add_argument_group("data")
    g.add_argument("--data", nargs="*", default=d["data"], help="NAME=ROOT for each training dataset (data.py names)")
    g.add_argument("--batch-size", "-B", type=int, default=d["batch_size"], help="images per step (per rank)")
    g.add_argument("--alpha", type=float, default=d["alpha"], help="dataset drawn with probability ~ n^alpha")
    g.add_argument("--seed", type=int, default=d["seed"])
    g = ap.add_argument_group("rollouts")
    g.add_argument("--num-generations", "-K", type=int, default=d["num_generations"])
    g.add_argument("--temperature", type=float, default=d["temperature"])
    g.add_argument("--top-p", type=float, default=d["top_p"])
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    g.add_argument("--fast", dest="thinking", action="store_false", help="answer-only prompt (no reasoning)")
    g.add_argument("--straightforward", action="store_true", help="repeat each prompt K times (the reference path)")
    g = ap.add_argument_group("reward")
    g.add_argument("--w-format", type=float, default=d["w_format"])
    g.add_argument("--weights", type=float, nargs=5, default=d["weights"], metavar="W",
                   help="weights of sharpness color noise composition overall (default .25 .25 .25 .25 1)")
    g.add_argument("--gamma", type=float, default=d["gamma"])
    g.add_argument("--ignore-ties", action="store_true", help="leave tied-label pairs out of the fidelity mean")
    g = ap.add_argument_group("loss")
    g.add_argument("--beta", type=float, default=d["beta"], help="k3 KL coefficient")
    g.add_argument("--epsilon", type=float, default=d["epsilon"])
    g.add_argument("--epsilon-high", type=float, default=d["epsilon_high"])
    g.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo"), default=d["loss_type"])
    g.add_argument("--num-iterations", type=int, default=d["num_iterations"])
    g.add_argument("--credit", choices=("sequence", "attribute"), default=d["credit"])
    g.add_argument("--entropy-coef", type=float, default=d["entropy_coef"], help="entropy bonus on score tokens")
    g.add_argument("--entropy-vocab", default=d["entropy_vocab"], help="the tokens (characters) the entropy bonus is taken over")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    g.add_argument("--schedule", choices=("constant", "cosine"), default=d["schedule"])
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    g.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="images per micro-batch (0: all)")
    g = ap.add_argument_group("run")
    g.add_argument("--steps", type=int, default=d["steps"])
    g.add_argument("--out", default=d["out"])
    g.add_argument("--save-every", type=int, default=d["save_every"])
    g.add_argument("--keep", type=int, default=d["keep"], help="checkpoints kept")
    g.add_argument("--eval-every", type=int, default=d["eval_every"])
    g.add_argument("--eval-limit", type=int, default=d["eval_limit"])
    g.add_argument("--resume", default=None, help="run directory to continue (its config.json is used)")
    g.add_argument("--merge", default=None, help="after training, write a merged transformers checkpoint here")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--demo", action="store_true", help="the CPU demo: synthetic data, warm-up, GRPO, evaluation")
    g.add_argument("--ablation", action="store_true", help="with --demo: overall-only reward from the same warm-up")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        import demo
        return demo.main(args)
    cfg = {**DEFAULTS, **{k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}}
    if args.resume:
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        cfg = {**saved, "steps": max(saved["steps"], args.steps if args.steps != DEFAULTS["steps"] else 0), "out": args.resume}
    if not cfg["data"]:
        sys.exit("error: --data NAME=ROOT is required (or --demo)")
    import torch.distributed as dist
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            cfg["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank; sampling streams differ below
    model, processor, ref = build_model(cfg)
    torch.manual_seed(cfg["seed"] * 1000 + rank)
    import data
    train_sets, heldout = load_data(cfg, rank)
    sampler = data.Sampler(train_sets, cfg["batch_size"], cfg["alpha"], seed=cfg["seed"] * 1000 + rank)
    eval_fn = None
    if cfg["eval_every"] and heldout:
        import evaluate
        subset = heldout[:cfg["eval_limit"]]

        def eval_fn(m, step):
            rows = evaluate.evaluate_records(m, processor, subset, thinking=cfg["thinking"],
                                             max_new_tokens=cfg["max_new_tokens"])
            return evaluate.summarize(rows, subset)
    train(cfg, model, processor, sampler, ref_model=ref, eval_fn=eval_fn)
    if args.merge and rank == 0:
        save_merged(model, processor, args.merge)
        print(f"merged checkpoint written to {args.merge}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
