"""One GRPO step, read against the equations (docs/METHOD.md, "GRPO"): K rollouts per image, the
reward, per-token advantages, the clipped surrogate with the k3 KL term, one AdamW update.

Rows are image-major: the K rollouts of image i are rows i*K .. i*K+K-1. Shapes: B images, K rollouts,
A attributes, T completion tokens.

Device and precision, by construction:
- `to_device` is the one place where a batch (preferences, labels, encoded prompts) meets the
  model's device; everything that enters the loss is computed from it, on that device.
- Trainable state is fp32 (LoRA's A and B; `--full`'s master weights). `precision` runs a `--full`
  model's compute in bf16 under torch.autocast where the run asks for bf16 (FSDP2 casts instead).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch

import metrics
import lora
import mgiqa
import parallel
import reward
import rollouts
from mgiqa import ATTRIBUTES


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


def aggregate(per_token, mask, mode="grpo", max_len=None, rows=None, tokens=None):
    """grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all tokens of
    the batch; dr_grpo: sum over tokens / (rows * max completion length). rows / tokens: the whole
    batch's counts when per_token holds one micro-batch of it, so that micro-batches sum to it."""
    mask = mask.to(per_token.dtype)
    rows = per_token.shape[0] if rows is None else rows
    if mode == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    if mode == "bnpo":
        return (per_token * mask).sum() / (mask.sum() if tokens is None else tokens).clamp(min=1)
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (rows * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r} (grpo, bnpo, dr_grpo)")


# ----------------------------------------------------------------------------- device and precision

def to_device(batch, device):
    """The batch's tensors (in a dict, or the fields of rollouts.Prompts) on `device`; the rest as is."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        return tuple(move(x) for x in v) if isinstance(v, tuple) else v

    if isinstance(batch, rollouts.Prompts):
        return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
    return {k: move(v) for k, v in batch.items()}


def compute_dtype(cfg, device) -> torch.dtype:
    """--dtype auto: bf16 on CUDA, fp32 on the CPU."""
    if cfg["dtype"] == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, cfg["dtype"])


def precision(cfg, model):
    """bf16 compute over fp32 weights for --full (autocast); LoRA's base already is in the compute dtype."""
    device = next(model.parameters()).device
    dtype = compute_dtype(cfg, device)
    if cfg["full"] and not cfg["fsdp"] and dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the step

@dataclasses.dataclass
class Rollouts:
    prompts: rollouts.Prompts
    ids: torch.Tensor        # (B*K, T) sampled completion tokens
    mask: torch.Tensor       # (B*K, T) 1 up to and including the first EOS
    completions: list[str]   # (B*K,) decoded


def sample_rollouts(cfg, policy, processor, images) -> Rollouts:
    model = parallel.unwrap(policy)
    eos, banned, pad = mgiqa.eos_ids(model, processor), mgiqa.banned_token_ids(processor), processor.tokenizer.pad_token_id
    model.eval()
    p = images if isinstance(images, rollouts.Prompts) else rollouts.encode_prompts(model, processor, images, cfg["thinking"])
    p = to_device(p, next(model.parameters()).device)
    with parallel.gathered_for_generation(policy):
        ids = parallel.for_inference(policy)("rollout", p, cfg["num_generations"], cfg["max_new_tokens"], eos, pad, banned,
                                             cfg["temperature"], cfg["top_p"], shared_prefix=not cfg["straightforward"],
                                             force_length=cfg["force_length"])
    return Rollouts(p, ids, rollouts.completion_mask(ids, eos), mgiqa.decode_completions(processor, ids, eos))


def update(cfg, policy, processor, roll: Rollouts, adv, attr_tokens, ref=None, aux_loss=None, optimizer=None) -> dict:
    """num_iterations AdamW steps on the surrogate; micro-batches of whole images add up to the full batch."""
    model, K = parallel.unwrap(policy), cfg["num_generations"]
    B, banned, shared = roll.prompts.input_ids.shape[0], mgiqa.banned_token_ids(processor), not cfg["straightforward"]
    # the entropy bonus acts on the score's own vocabulary (the digits): over the full vocabulary it
    # pushed probability off the digits and broke the answer format within a few steps
    vocab = processor.tokenizer.convert_tokens_to_ids(list(cfg["entropy_vocab"]))
    score_vocab = [i for i in vocab if i is not None and i != processor.tokenizer.unk_token_id] if cfg["entropy_coef"] > 0 else False
    micro = cfg["micro_batch"] or B  # images per micro-batch; an image's K rows stay together
    groups = [[i * K + k for i in range(s, min(B, s + micro)) for k in range(K)] for s in range(0, B, micro)]

    def logprobs(engine, rows, entropy=False):
        return engine("logprobs", rollouts.select(roll.prompts, sorted({r // K for r in rows})), K, roll.ids[rows],
                      roll.mask[rows], cfg["temperature"], banned, shared, entropy=entropy)

    model.train()
    infer = parallel.for_inference(policy)
    with torch.no_grad():
        ref_lp = None
        if cfg["beta"] > 0 and ref is not None:
            ref_lp = torch.cat([logprobs(ref, g) for g in groups])
        elif cfg["beta"] > 0:
            with lora.adapters_disabled(model):  # LoRA: the reference is the base model
                ref_lp = torch.cat([logprobs(infer, g) for g in groups])
        old = torch.cat([logprobs(infer, g) for g in groups]) if cfg["num_iterations"] > 1 else None
    n_rows, n_tokens, score_pos = roll.ids.shape[0], roll.mask.sum(), (attr_tokens >= 0).float()
    stats = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0}
    for _ in range(cfg["num_iterations"]):
        optimizer.zero_grad(set_to_none=True)
        for gi, rows in enumerate(groups):
            m = roll.mask[rows]
            with parallel.no_sync(policy, last=gi == len(groups) - 1):
                out = logprobs(policy, rows, entropy=score_vocab)
                logp, ent = out if score_vocab else (out, None)
                per_token, clipped = clipped_surrogate(logp, old[rows] if old is not None else logp.detach(), adv[rows],
                                                       cfg["epsilon"], cfg["epsilon_high"])
                kl = k3_kl(logp, ref_lp[rows]) if ref_lp is not None else torch.zeros_like(logp)
                per_token = per_token + cfg["beta"] * kl  # k3 added after clipping, as TRL
                loss = aggregate(per_token, m, cfg["loss_type"], cfg["max_new_tokens"], n_rows, n_tokens)
                if ent is not None:
                    bonus = (ent * score_pos[rows]).sum() / score_pos.sum().clamp(min=1)
                    loss = loss - cfg["entropy_coef"] * bonus
                    stats["entropy"] += bonus.item()
                loss.backward()
            stats["loss"] += loss.item()
            stats["kl"] += ((kl * m).sum() / n_tokens.clamp(min=1)).item()
            stats["clip"] += ((clipped.float() * m).sum() / n_tokens.clamp(min=1)).item()
        if aux_loss is not None:
            aux = aux_loss(model)
            aux.backward()
            stats["aux"] = aux.item()
        norm = torch.nn.utils.clip_grad_norm_([q for q in policy.parameters() if q.requires_grad], cfg["grad_clip"])
        stats["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
    return stats


def grpo_step(cfg, policy, processor, batch, images, reward_fn=None, ref=None, aux_loss=None, optimizer=None) -> dict:
    """One GRPO step on one batch: rollouts -> rewards -> advantages -> loss and update. Returns the logged figures."""
    reward_fn = reward_fn or reward.mg_reward
    model = parallel.unwrap(policy)
    batch = to_device(batch, next(model.parameters()).device)
    t0 = time.perf_counter()
    with precision(cfg, model):
        roll = sample_rollouts(cfg, policy, processor, images)
    t1 = time.perf_counter()
    rewards = reward_fn(roll.completions, batch["P"], batch["M"], cfg["weights"], cfg["w_format"], cfg["thinking"],
                        cfg["gamma"], cfg["ignore_ties"])
    marked = cfg["credit"] == "attribute" or cfg["entropy_coef"] > 0
    attr_tokens = reward.score_token_attributes(processor.tokenizer, roll.ids, roll.mask) if marked else torch.full_like(roll.ids, -1)
    adv = reward.token_advantages(rewards, attr_tokens, cfg["credit"])  # (B*K, T)
    t2 = time.perf_counter()
    with precision(cfg, model):
        stats = update(cfg, policy, processor, roll, adv, attr_tokens, ref, aux_loss, optimizer)
    t3 = time.perf_counter()
    labels = batch.get("labels")
    return {"reward": rewards["total"].mean().item(), "reward_attr": rewards["per_attribute"].mean((0, 1)).tolist(),
            "format": rewards["format"].mean().item(), "length": roll.mask.sum(1).float().mean().item(),
            "srcc": within_batch_srcc(rewards["scores"].cpu(), labels.cpu()) if labels is not None else [float("nan")] * len(ATTRIBUTES),
            **stats, "gen_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "completions": roll.completions[:2],
            "prompt_tokens": int(roll.prompts.input_ids.shape[1]), "image_tokens": image_tokens(model, roll.prompts)}


def image_tokens(model, p: rollouts.Prompts) -> int:
    """Image tokens of the batch's B prompts (patches / merge^2)."""
    merge = getattr(model.config.vision_config, "spatial_merge_size", 2)
    return int(p.image_grid_thw.prod(-1).sum()) // merge ** 2


def within_batch_srcc(scores, labels) -> list[float]:
    """Spearman correlation, per attribute, of the mean rollout score (B, K, A) against the batch
    labels (B, A); NaN where fewer than 3 images have both, or either side is constant."""
    out = []
    for a in range(len(ATTRIBUTES)):
        s, y = scores[:, :, a].numpy(), labels[:, a].numpy()
        valid = ~np.isnan(s)
        x = np.where(valid.any(1), np.where(valid, s, 0).sum(1) / np.maximum(valid.sum(1), 1), np.nan)
        ok = ~(np.isnan(x) | np.isnan(y))
        out.append(float(metrics.srcc(x[ok], y[ok])) if ok.sum() >= 3 else float("nan"))  # ties as scipy
    return out
