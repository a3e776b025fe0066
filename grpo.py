"""GRPO for MG-IQA, written by hand (docs/METHOD.md, section 3): the configuration, the loss, one
step (`grpo_step`), the training loop, checkpoints and resume, and the training command line.

    python grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data kadid=/data/kadid10k koniq=/data/koniq10k --out runs/mgiqa --steps 2000  # one GPU
    torchrun --nproc_per_node 8 grpo.py --model ... --data ... --out runs/mgiqa      # LoRA, DDP
    torchrun --nproc_per_node 8 grpo.py --model ... --full --fsdp --data ... --out runs/f  # FSDP2
    python grpo.py --resume runs/mgiqa                       # continue exactly where it stopped
    python synth.py runs/synth --n 200 && python grpo.py --model tiny-qwen2.5-vl \
        --data manifest=runs/synth -B 2 -K 2 --max-new-tokens 16 --steps 4 --out runs/try  # CPU

A run writes in --out: config.json, split-<name>.csv per dataset (its split and each image's
SHA-256), log.jsonl (one line a step), checkpoint-STEP/ (the last --keep), and final/: the LoRA
adapter in PEFT's layout, or with --full a plain transformers checkpoint (fp32 master weights).
--merge DIR also writes LoRA folded into the base. Every model folder carries training_data.csv
(data.TRAINING_DATA), what it trained on, which evaluate.py reads to score no training image. A
--out that holds a run is refused without --resume; --resume refuses flags that differ from the
run's config.json.

Where this departs from VisualQuality-R1 (LoRA by default, the shared prefix, the options that are
off by default, fp32 trainable state): docs/METHOD.md, section 7, numbered.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
import distributed
import evaluate
import lora
import mgiqa
import reward
import rollouts
from mgiqa import ATTRIBUTES


# ----------------------------------------------------------------------------- configuration

def option(default, group: str, help: str, **argparse_kwargs):
    """A Config field: its default, its command-line group and its help (the field's comment)."""
    return field(default=default, metadata={"group": group, "help": help, **argparse_kwargs})


@dataclass
class Config:
    """Every setting of a run, with the paper's (VisualQuality-R1's) defaults unless marked ours.
    The command line is built from these fields (build_parser); config.json holds them."""
    # model
    model: str = option("tiny", "model", "checkpoint folder or hub id; offline test models: "
                        + ", ".join(mgiqa.TINY_MODELS))
    full: bool = option(False, "model",
                        "fine-tune every weight (VisualQuality-R1) instead of LoRA (ours)")
    fsdp: bool = option(False, "model", "with --full under torchrun: shard weights, gradients and "
                                        "AdamW states (FSDP2)")
    lora_rank: int = option(64, "model", "LoRA rank r")
    lora_alpha: float = option(128.0, "model", "LoRA alpha; the adapter's scale is alpha / r")
    lora_dropout: float = option(0.0, "model", "LoRA dropout (rho = 1 on the first update anyway)")
    lora_vision: bool = option(False, "model",
                               "also put adapters on the vision tower (else it stays frozen)")
    dtype: str = option("auto", "model", "compute dtype: auto (bf16 on CUDA, fp32 on CPU), "
                                         "bfloat16, float32; trainable state is fp32 always")
    device: str = option("auto", "model", "auto, cpu, cuda, cuda:1 (torchrun sets each rank's)")
    gradient_checkpointing: bool = option(False, "model",
                                          "recompute activations in backward (less memory)")
    max_pixels: int = option(0, "model", "pixel cap per image; 0: 1,280 image tokens in the "
                                         "family's units (Qwen2.5-VL 1,003,520 px of 28 px tokens; "
                                         "Qwen3-VL 1,310,720 px of 32 px)")
    # data
    data: list = option((), "data", "NAME=ROOT[,FILE][,KEY=VALUE] per training dataset (data.py)",
                        nargs="*")
    batch_size: int = option(8, "data", "B images per step and rank, all from one dataset "
                                        "(VisualQuality-R1: 8 per GPU)", short="-B")
    alpha: float = option(0.5, "data", "a dataset is drawn with probability ~ n^alpha (ours)")
    seed: int = option(0, "data", "seed of weights, splits, sampler and rollouts")
    # rollouts
    num_generations: int = option(6, "rollouts", "K rollouts per image (VisualQuality-R1: 6)",
                                  short="-K")
    temperature: float = option(1.0, "rollouts", "sampling temperature")
    top_p: float = option(1.0, "rollouts", "nucleus sampling: refused below 1 (check_config)")
    max_new_tokens: int = option(256, "rollouts", "longest completion (VisualQuality-R1: 256)")
    thinking: bool = option(True, "rollouts",
                            "reason in <think> before the answer (--no-thinking: answer only)")
    shared_prefix: bool = option(True, "rollouts", "vision tower and prompt once per image, not K "
                                                   "times (same numbers; --no-shared-prefix: the "
                                                   "plain path)")
    force_length: bool = option(False, "rollouts", "never stop at EOS (timing runs: every "
                                                   "completion is max-new-tokens long)")
    # reward
    w_format: float = option(1.0, "reward", "weight of the strict-format reward")
    weights: list = option(tuple(reward.DEFAULT_WEIGHTS), "reward",
                           "weights of " + " ".join(ATTRIBUTES),
                           nargs=len(ATTRIBUTES), metavar="W")
    gamma: float = option(1e-6, "reward", "added to the variance sum in the Thurstone probability")
    ignore_ties: bool = option(False, "reward",
                               "leave tied-label pairs out of the fidelity mean (ours)")
    credit: str = option("sequence", "reward", "sequence: one advantage per completion; "
                                               "attribute: each score token its attribute's "
                                               "advantage, times its weight (ours)",
                         choices=("sequence", "attribute"))
    entropy_coef: float = option(0.0, "reward", "entropy bonus on the score tokens (ours)")
    entropy_vocab: str = option("0123456789", "reward",
                                "characters whose tokens the entropy bonus is renormalised over")
    # loss
    beta: float = option(0.04, "loss", "k3 KL coefficient (VisualQuality-R1: 0.04)")
    epsilon: float = option(0.2, "loss", "lower clip range of rho")
    epsilon_high: float = option(0.2, "loss", "upper clip range of rho")
    loss_type: str = option("grpo", "loss", "token aggregation",
                            choices=("grpo", "bnpo", "dr_grpo"))
    num_iterations: int = option(1, "loss", "updates per batch of rollouts (rho = 1 on the first)")
    # optimisation
    lr: float = option(None, "optimisation",
                       "AdamW learning rate (default: 1e-5 LoRA, 1e-6 --full)", type=float)
    weight_decay: float = option(0.0, "optimisation", "AdamW weight decay")
    warmup_steps: int = option(0, "optimisation", "linear learning-rate warm-up steps")
    schedule: str = option("constant", "optimisation", "learning rate after warm-up",
                           choices=("constant", "cosine"))
    grad_clip: float = option(1.0, "optimisation", "gradient norm clip")
    micro_batch: int = option(0, "optimisation", "images per forward/backward (0: all B); "
                                                 "gradients equal the full batch's")
    # run
    out: str = option("runs/mgiqa", "run", "run directory (checkpoints, log.jsonl, final/)")
    steps: int = option(1000, "run", "training steps")
    save_every: int = option(100, "run", "checkpoint every N steps")
    keep: int = option(2, "run", "checkpoints kept")
    eval_every: int = option(0, "run", "held-out evaluation every N steps (0: never)")
    eval_limit: int = option(200, "run",
                             "images in that evaluation, a stratified subset of every dataset")

    def __post_init__(self):
        self.data = list(self.data or [])
        self.weights = [float(w) for w in self.weights]
        if self.lr is None:
            self.lr = 1e-6 if self.full else 1e-5  # full: VisualQuality-R1; LoRA: ours


def check_config(cfg: Config) -> None:
    """Settings no run may use, refused before any work with the reason (ValueError)."""
    if cfg.top_p < 1:
        # the ratio and the KL use token_logprobs' full distribution, not the truncated one
        raise ValueError(f"--top-p {cfg.top_p}: training samples from the full distribution "
                         "(--top-p 1) only; nucleus sampling would draw from a truncated "
                         "distribution while the ratio and the KL use the full one")


def lr_lambda(cfg: Config):
    def factor(i):
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            progress = (i - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def compute_dtype(cfg: Config, device) -> torch.dtype:
    """--dtype auto: bf16 on CUDA, fp32 on the CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def precision(cfg: Config, model):
    """bf16 compute over --full's fp32 master weights (autocast); LoRA's base is already in the
    compute dtype, and FSDP2 casts on its own."""
    device = next(model.parameters()).device
    dtype = compute_dtype(cfg, device)
    if cfg.full and not cfg.fsdp and dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the loss

def k3_kl(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per token, >= 0 (Schulman, "Approximating KL divergence")."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low=0.2, eps_high=0.2):
    """-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) per token; also which tokens were clipped."""
    rho = torch.exp(logp - old_logp)
    unclipped, clipped = rho * advantages, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def aggregate(per_token, mask, mode="grpo", max_len=None, rows=None, tokens=None):
    """grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all tokens of
    the batch; dr_grpo: sum / (rows * max completion length). rows / tokens: the whole batch's
    counts when per_token holds one micro-batch of it, so that micro-batches add up to the full
    batch."""
    mask = mask.to(per_token.dtype)
    rows = per_token.shape[0] if rows is None else rows
    if mode == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    if mode == "bnpo":
        return (per_token * mask).sum() / (mask.sum() if tokens is None else tokens).clamp(min=1)
    if mode == "dr_grpo":
        return (per_token * mask).sum() / (rows * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown loss aggregation {mode!r} (grpo, bnpo, dr_grpo)")


# ----------------------------------------------------------------------------- one step

@dataclass
class Tokens:
    """The token ids a step needs, resolved once through the run's tokenizer."""
    eos: list[int]                    # completion ends (the model's EOS and <|im_end|>)
    pad: int                          # after the EOS
    banned: torch.Tensor              # (V,) bool: special tokens never sampled nor in log-softmax
    entropy: torch.Tensor | None      # ids the entropy bonus is renormalised over (None: no bonus)
    opening: str = ""                 # what the template writes for the completion ("<think>\n")

    @classmethod
    def resolve(cls, cfg: Config, model, processor) -> Tokens:
        device, V = next(model.parameters()).device, model.get_output_embeddings().out_features
        banned = torch.zeros(V, dtype=torch.bool, device=device)
        banned[mgiqa.banned_token_ids(processor, V)] = True
        entropy = None
        if cfg.entropy_coef > 0:
            entropy = mgiqa.token_ids(processor, list(cfg.entropy_vocab))
        return cls(mgiqa.eos_ids(model, processor), processor.tokenizer.pad_token_id, banned,
                   None if entropy is None else torch.tensor(entropy, device=device),
                   mgiqa.template_opening(processor, cfg.thinking))


def grpo_step(cfg: Config, policy, processor, batch, prompts, optimizer, tokens: Tokens, *,
              ref=None, aux_loss=None, reward_fn=reward.mg_reward) -> dict:
    """One GRPO step on one domain-pure batch of B images; the numbers follow docs/METHOD.md,
    section 3."""
    model, K, B = distributed.unwrap(policy), cfg.num_generations, prompts.input_ids.shape[0]
    clock = Phases()
    # (1) sample K completions per image (rows image-major), weights gathered once under FSDP2
    model.eval()
    with torch.no_grad(), distributed.gathered(policy), precision(cfg, model):
        engine = distributed.policy_of(policy)
        ids = engine.sample(prompts, K=K, max_new_tokens=cfg.max_new_tokens, eos_ids=tokens.eos,
                            pad_id=tokens.pad, banned=tokens.banned, temperature=cfg.temperature,
                            top_p=cfg.top_p, force_length=cfg.force_length)  # (B*K, T)
    mask = rollouts.completion_mask(ids, tokens.eos)
    completions = mgiqa.decode_completions(processor, ids, tokens.eos, tokens.opening)
    clock.end("sampling")
    # (2) parse and reward: R = w_format F + sum_a w_a r_a, one fidelity reward per attribute
    rewards = reward_fn(completions, batch["P"], batch["M"], weights=cfg.weights,
                        w_format=cfg.w_format, thinking=cfg.thinking, gamma=cfg.gamma,
                        ignore_ties=cfg.ignore_ties)
    # (3) advantages per token: the completion's, or (--credit attribute) each score token its
    # attribute's, scaled by that attribute's weight
    need_score_positions = cfg.credit == "attribute" or cfg.entropy_coef > 0
    if need_score_positions:  # which attribute each score token belongs to (-1: none)
        attr = reward.score_token_attributes(processor.tokenizer, ids, mask)
    else:
        attr = torch.full_like(ids, -1)
    adv = reward.token_advantages(rewards, attr, credit=cfg.credit, weights=cfg.weights)  # (B*K, T)
    clock.end("reward")
    # (4) log-probs of the reference (beta k3) and, for later iterations, of the policy that sampled
    model.train()
    micro = cfg.micro_batch or B  # images per forward; an image's K rows stay together
    micro_batches = [list(range(s * K, min(B, s + micro) * K)) for s in range(0, B, micro)]

    def logprobs(engine, rows, entropy_ids=None):
        """Per-token log-probs (and entropies over entropy_ids) of completions `rows` under engine,
        each image's prompt taken once (rows[::K]: its first row)."""
        images = [r // K for r in rows[::K]]
        return engine(rollouts.select(prompts, images), ids[rows], mask[rows], K=K,
                      temperature=cfg.temperature, banned=tokens.banned, entropy_ids=entropy_ids)

    with torch.no_grad(), precision(cfg, model):
        ref_lp = reference_logprobs(cfg, policy, ref, micro_batches, logprobs)
        old_lp = None
        if cfg.num_iterations > 1:  # the policy that sampled, for the ratio of later updates
            sampled_by = distributed.for_inference(policy)
            old_lp = torch.cat([logprobs(sampled_by, rows)[0] for rows in micro_batches])
    clock.end("reference")
    # (5) clipped surrogate + beta k3, aggregated; backward per micro-batch; gradient clip; AdamW
    n_tokens, score_tokens = mask.sum(), (attr >= 0).float()
    stats = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for m, rows in enumerate(micro_batches):
            last = m == len(micro_batches) - 1  # DDP all-reduces in the last backward only
            with distributed.no_sync(policy, last=last), precision(cfg, model):
                logp, ent = logprobs(policy, rows, tokens.entropy)
                # on-policy (first update): rho = exp(logp - logp.detach()) = 1, gradient of logp
                old = logp.detach() if old_lp is None else old_lp[rows]
                per_token, clipped = clipped_surrogate(logp, old, adv[rows], cfg.epsilon,
                                                       cfg.epsilon_high)
                kl = torch.zeros_like(logp) if ref_lp is None else k3_kl(logp, ref_lp[rows])
                loss = aggregate(per_token + cfg.beta * kl, mask[rows], mode=cfg.loss_type,
                                 max_len=cfg.max_new_tokens, rows=B * K, tokens=n_tokens)
                bonus = torch.zeros((), device=logp.device)
                if ent is not None:  # mean entropy over the whole batch's score tokens
                    bonus = (ent * score_tokens[rows]).sum() / score_tokens.sum().clamp(min=1)
                (loss - cfg.entropy_coef * bonus).backward()
            masked_tokens = n_tokens.clamp(min=1)
            stats["loss"] += float(loss.detach()) / cfg.num_iterations  # a mean per update
            stats["entropy"] += float(bonus.detach()) / cfg.num_iterations
            kl_mean = (kl.detach() * mask[rows]).sum() / masked_tokens
            stats["kl"] += float(kl_mean) / cfg.num_iterations
            clip_share = (clipped.float() * mask[rows]).sum() / masked_tokens
            stats["clip"] += float(clip_share) / cfg.num_iterations
        if aux_loss is not None:  # the demo's probe on distortion-family labels (one process)
            aux = aux_loss(model)
            aux.backward()
            stats["aux"] = aux.item()
        trainable = [q for q in policy.parameters() if q.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        stats["grad_norm"] += float(norm) / cfg.num_iterations
        optimizer.step()
    clock.end("update")
    return step_figures(rewards, batch, mask, completions, prompts, model) | stats | clock.figures()


class Phases:
    """Seconds, and on CUDA the peak memory, of each phase of a step (the peak counter is reset at
    each end)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.start, self.seen = time.perf_counter(), {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def end(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seen[name] = {"s": now - self.start}
        if self.cuda:
            self.seen[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def figures(self) -> dict:
        s = {name: v["s"] for name, v in self.seen.items()}
        return {"phases": self.seen, "gen_s": s.get("sampling", 0.0),
                "reward_s": s.get("reward", 0.0),
                "update_s": s.get("reference", 0.0) + s.get("update", 0.0)}


def reference_logprobs(cfg: Config, policy, ref, micro_batches, logprobs):
    """Log-probs of the reference policy (for beta k3): the frozen copy (--full), or the same model
    with its adapters switched off (LoRA: no second copy); None when beta = 0. logprobs(engine,
    rows) is grpo_step's, run on each micro-batch's rows."""
    if cfg.beta <= 0:
        return None
    if ref is not None:
        return torch.cat([logprobs(ref, rows)[0] for rows in micro_batches])
    with lora.adapters_disabled(distributed.unwrap(policy)):
        engine = distributed.for_inference(policy)
        return torch.cat([logprobs(engine, rows)[0] for rows in micro_batches])


def step_figures(rewards, batch, mask, completions, prompts, model) -> dict:
    """What a step logs besides the loss: rewards, parse rate, length, within-batch SRCC, token
    counts."""
    labels = batch.get("labels")
    nan = [float("nan")] * len(ATTRIBUTES)
    merge = getattr(model.config.vision_config, "spatial_merge_size", 2)
    srcc = nan if labels is None else within_batch_srcc(rewards["scores"].cpu(), labels.cpu())
    return {"reward": rewards["total"].mean().item(),
            "reward_attr": rewards["per_attribute"].mean((0, 1)).tolist(),
            "format": rewards["format"].mean().item(), "length": mask.sum(1).float().mean().item(),
            "srcc": srcc,
            "completions": completions[:2], "prompt_tokens": int(prompts.input_ids.shape[1]),
            "image_tokens": int(prompts.image_grid_thw.prod(-1).sum()) // merge ** 2}


def within_batch_srcc(scores, labels) -> list[float]:
    """Per attribute, SRCC of the mean rollout score (B, K, A) against the labels (B, A); NaN where
    fewer than 3 images have both."""
    out = []
    for a in range(len(ATTRIBUTES)):
        s, y = scores[:, :, a].numpy(), labels[:, a].numpy()
        valid = ~np.isnan(s)
        mean = np.where(valid, s, 0).sum(1) / np.maximum(valid.sum(1), 1)
        x = np.where(valid.any(1), mean, np.nan)
        ok = ~(np.isnan(x) | np.isnan(y))
        out.append(float(evaluate.srcc(x[ok], y[ok])) if ok.sum() >= 3 else float("nan"))
    return out


# ----------------------------------------------------------------------------- the loop

def to_device(batch: dict, device) -> dict:
    """The one place where a batch (its preferences and labels) meets the model's device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def format_line(i: int, s: dict) -> str:
    attrs = " ".join(f"{a[:4]} {r:.3f}" for a, r in zip(ATTRIBUTES, s["reward_attr"]))
    srcc = " ".join(f"{x:+.2f}" for x in s["srcc"])
    return (f"step {i:5d} | reward {s['reward']:.3f} ({attrs}) | format {s['format']:.2f} | "
            f"srcc {srcc} | kl {s['kl']:.4f} clip {s['clip']:.3f} | len {s['length']:.1f} | "
            f"gen {s['gen_s']:.2f}s reward {s['reward_s']:.2f}s update {s['update_s']:.2f}s"
            + (f" | elapsed {duration(s['elapsed_s'])} eta {duration(s['eta_s'])}"
               if "eta_s" in s else ""))


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 12s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train(cfg: Config, model, processor, sampler, *, prompts_of=None, ref_model=None,
          aux_loss=None, eval_fn=None, log=print, reward_fn=None) -> list[dict]:
    """Resume from the newest checkpoint in cfg.out if there is one, then step until cfg.steps,
    checkpointing every cfg.save_every steps; at the end final/ (export). prompts_of(records) ->
    rollouts.Prompts (default: the records' image files through the processor); eval_fn(model, step)
    -> dict runs on rank 0 while the others wait; reward_fn defaults to reward.mg_reward.
    aux_loss(model) -> scalar is added to each update's gradient (the demo's probe; one process
    only: its backward would run outside DDP's synchronised one). Returns the logged figures of
    each step."""
    check_config(cfg)
    if aux_loss is not None and distributed.is_distributed():
        raise ValueError("aux_loss under torchrun: its gradients would not be all-reduced across "
                         "ranks (it runs outside the synchronised backward); train in one process")
    run_dir, rank = Path(cfg.out), distributed.rank()
    device = next(model.parameters()).device
    policy = distributed.wrap(model, cfg.fsdp, compute_dtype(cfg, device), cfg.shared_prefix)
    ref = None
    if ref_model is not None:
        ref = distributed.wrap(ref_model, cfg.fsdp, compute_dtype(cfg, device), cfg.shared_prefix)
    trainable = [q for q in policy.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    tokens, i = Tokens.resolve(cfg, model, processor), 0
    if checkpoints(run_dir):
        latest = run_dir / f"checkpoint-{checkpoints(run_dir)[-1]}"
        i = load_checkpoint(latest, policy, optimizer, scheduler, sampler)
        if rank == 0:
            log(f"resumed from {latest} at step {i}")
    if rank == 0:
        _truncate_log(run_dir / "log.jsonl", i)  # lines past the checkpoint (all, without one)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    text = mgiqa.prompt_text(processor, cfg.thinking)

    def image_prompts(records):
        """The records' image files through the processor, each under the run's prompt text."""
        return rollouts.encode_prompts(model, processor, [r.image for r in records], text)
    prompts_of = prompts_of or image_prompts
    history, saved, start, first = [], {}, time.perf_counter(), i
    while i < cfg.steps:
        batch = to_device(sampler.sample(), device)
        prompts = rollouts.to_device(prompts_of(batch["records"]), device)
        stats = grpo_step(cfg, policy, processor, batch, prompts, optimizer, tokens, ref=ref,
                          aux_loss=aux_loss, reward_fn=reward_fn or reward.mg_reward)
        scheduler.step()
        i += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / (i - first) * (cfg.steps - i)  # at this session's mean step time
        stats.update(step=i, dataset=batch["dataset"], lr=scheduler.get_last_lr()[0],
                     elapsed_s=elapsed, eta_s=eta)
        if eval_fn is not None and cfg.eval_every and (i % cfg.eval_every == 0 or i == cfg.steps):
            if rank == 0:
                with torch.no_grad(), precision(cfg, model):
                    stats["eval"] = eval_fn(model, i)
            distributed.barrier()
        stats["phases"] |= saved  # the previous checkpoint's write, if any since the last line
        if rank == 0:  # the line is on disk before the checkpoint: a crash while saving loses none
            log(format_line(i, stats)
                + (f" | eval {_json(stats['eval'])}" if "eval" in stats else ""))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(_json(stats) + "\n")
        saved = {}
        if cfg.save_every and (i % cfg.save_every == 0 or i == cfg.steps):
            clock = Phases()
            save_checkpoint(run_dir, i, policy, optimizer, scheduler, sampler, cfg)
            clock.end("save")
            saved = {"save_previous": clock.seen["save"]}
        history.append(stats)
    export(policy, processor, run_dir / "final", cfg)
    return history


def _json(obj) -> str:
    # NaN -> null: strict JSON readers open it
    return json.dumps(mgiqa.json_safe(obj), allow_nan=False, default=str)


def _truncate_log(path: Path, i: int) -> None:
    """Drop log lines after the checkpoint we resume from, so no step is logged twice."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines()
                 if ln.strip() and json.loads(ln)["step"] <= i]
        path.write_text("".join(ln + "\n" for ln in lines))


# ----------------------------------------------------------------------------- checkpoints
# runs/x/checkpoint-STEP/: adapter/ (LoRA, PEFT layout) or trainable.safetensors (--full) or
# sharded/ (--fsdp, torch.distributed.checkpoint); trainer_state.pt (step, optimizer, schedule,
# config, world size); rank-R.pt (rank R's sampler and RNG states). Written under
# checkpoint-STEP.tmp and renamed by rank 0 once every rank has written its part, so a crash
# mid-write leaves the previous one whole. Read back with map_location="cpu" and weights_only=True:
# a checkpoint is data, never code.

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (set_device was called)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable weights on the CPU (an unsharded model)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def checkpoints(run_dir) -> list[int]:
    """Steps of the complete checkpoints in a run directory (partial *.tmp ones are ignored)."""
    return sorted(int(m.group(1)) for d in Path(run_dir).glob("checkpoint-*")
                  if (m := re.fullmatch(r"checkpoint-(\d+)", d.name))
                  and (d / "trainer_state.pt").is_file())


def save_checkpoint(run_dir, step, policy, optimizer, scheduler, sampler, cfg: Config) -> Path:
    """Every rank calls this; each writes its part, rank 0 the shared files and the rename."""
    from safetensors.torch import save_file

    rank, world = distributed.rank(), distributed.world_size()
    run_dir = Path(run_dir)
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    model = distributed.unwrap(policy)
    state = {"step": step, "scheduler": scheduler.state_dict(), "config": dataclasses.asdict(cfg),
             "world_size": world}
    if cfg.fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(policy, optimizer)  # this rank's shards
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "sharded"))
    elif rank == 0:  # DDP ranks hold identical weights and optimizer states
        state["optimizer"] = optimizer.state_dict()
        if cfg.full:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        else:
            lora.save_adapter(model, tmp / "adapter", cfg.lora_rank, cfg.lora_alpha,
                              cfg.lora_dropout, cfg.model)
    torch.save({"sampler": sampler.state_dict(), "rng": rng_state()}, tmp / f"rank-{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "trainer_state.pt")
        carry_training_data(run_dir, tmp, *([] if cfg.full else [tmp / "adapter"]))
    distributed.barrier()  # every rank's files are on disk before the rename makes it count
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-cfg.keep]:
            shutil.rmtree(run_dir / f"checkpoint-{old}", ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(path, policy, optimizer, scheduler, sampler) -> int:
    """Restore a checkpoint written by save_checkpoint on the same world size; returns its step."""
    from safetensors.torch import load_file

    path, rank = Path(path), distributed.rank()
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != distributed.world_size():
        raise ValueError(f"{path}: written by {state['world_size']} processes, this run has "
                         f"{distributed.world_size()}; resume with the same --nproc_per_node")
    own = path / f"rank-{rank}.pt"
    if not own.is_file():
        raise FileNotFoundError(f"{own}: missing, so rank {rank}'s sampler and RNG states cannot "
                                "be restored")
    mine = torch.load(own, map_location="cpu", weights_only=True)
    model = distributed.unwrap(policy)
    if state["config"]["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(policy, optimizer)
        shards = {"model": msd, "optimizer": osd}
        dcp.load(shards, checkpoint_id=str(path / "sharded"))
        set_state_dict(policy, optimizer, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"])
    else:
        if (path / "trainable.safetensors").is_file():
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in load_file(str(path / "trainable.safetensors")).items():
                    params[name].copy_(value)
        else:
            lora.load_adapter_weights(model, path / "adapter")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    return int(state["step"])


def export(policy, processor, out, cfg: Config) -> Path:
    """The end of a run, in `out`: the LoRA adapter, or (--full) a plain transformers checkpoint of
    all weights, gathered onto rank 0 under --fsdp, saved with a generation config that holds only
    the special-token ids (mgiqa.plain_generation_config), so no decoding setting travels with
    it."""
    out, model = Path(out), distributed.unwrap(policy)
    if not cfg.full:
        if distributed.rank() == 0:
            lora.save_adapter(model, out, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                              cfg.model)
            carry_training_data(cfg.out, out)
        distributed.barrier()
        return out
    # a collective: every rank calls it
    state = distributed.full_state_dict(policy) if cfg.fsdp else None
    if distributed.rank() == 0:
        model.generation_config = mgiqa.plain_generation_config(model)
        model.save_pretrained(out, state_dict=state)
        processor.save_pretrained(out)
        carry_training_data(cfg.out, out)
    distributed.barrier()
    return out


def carry_training_data(run_dir, *folders) -> None:
    """Copy the run's list of its images (data.TRAINING_DATA: what it trained on, by SHA-256, and
    the held-out rest) into model folders, so evaluate.py can leave trained images out."""
    source = Path(run_dir) / data.TRAINING_DATA
    if source.is_file():
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, Path(folder) / data.TRAINING_DATA)


def save_merged(model, processor, out) -> None:
    """LoRA folded in (fp32 sum, cast once): a plain transformers checkpoint for mgiqa.load,
    evaluate.py, from_pretrained and vLLM, with a clean generation config and the processor
    files."""
    lora.merge_lora(model)
    model.generation_config = mgiqa.plain_generation_config(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# ----------------------------------------------------------------------------- model and data

def build_model(cfg: Config):
    """(model, processor, reference or None): LoRA (fp32 adapters on a base in the compute dtype;
    the reference is the base, adapters off) or --full (fp32 master weights; a frozen copy in the
    compute dtype as the reference unless beta = 0)."""
    device = mgiqa.resolve_device(cfg.device)
    dtype = compute_dtype(cfg, device)
    load_dtype = str(torch.float32 if cfg.full else dtype).removeprefix("torch.")
    model, processor = mgiqa.load(cfg.model, device=str(device), dtype=load_dtype,
                                  max_pixels=cfg.max_pixels, seed=cfg.seed)
    if model.config.model_type not in mgiqa.TRAINABLE_MODEL_TYPES:
        raise ValueError(f"{cfg.model}: grpo.py trains {', '.join(mgiqa.TRAINABLE_MODEL_TYPES)} "
                         f"models, not {model.config.model_type!r} (mgiqa.py and evaluate.py "
                         "score it)")
    rollouts.fast_vision(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        # non-reentrant checkpointing needs no input that requires grad; transformers' hook on every
        # input embedding (the vision tower's patch embedding too) would send backward through a
        # frozen tower
        model.disable_input_require_grads()
        model.config.use_cache = True
    ref = None
    if cfg.full:
        if cfg.beta > 0:
            ref = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                      vision=cfg.lora_vision)
    return model, processor, ref


def load_data(cfg: Config, rank: int = 0):
    """Training and held-out records from --data, one training set per dataset the records name;
    each dataset's split, with the SHA-256 of every image (hashed once, kept for a resume), is
    written to the run dir as split-<dataset>.csv (atomically, by rank 0) and read back by every
    rank. Rank 0 also writes the run's data.TRAINING_DATA: those lists, plus the list of a --model
    that was itself trained here (its images stay trained-on); every model folder carries it."""
    train_sets, heldout = {}, []
    loaded = []
    for spec in cfg.data:
        try:
            name, root, opts = data.parse_spec(spec)
        except ValueError as err:
            raise SystemExit(f"error: --data: {err}") from None
        for dataset, records in _by_dataset(data.load_dataset(name, root, **opts)).items():
            if dataset in train_sets or dataset in dict(loaded):
                raise SystemExit(f"error: --data {spec!r}: dataset {dataset!r} is given twice")
            loaded.append((dataset, data.split_records(records, seed=cfg.seed)))
    for dataset, records in loaded:
        split_path = Path(cfg.out) / f"split-{dataset}.csv"
        if rank == 0 and not data.has_hashes(str(split_path)):
            if split_path.is_file():  # a run from before hashes were kept: its images, now hashed
                records = data.apply_split(records, data.load_split(str(split_path)))
            hashes = data.sha256_files([r.image for r in records], what=dataset)
            data.save_split(records, str(split_path), hashes=hashes)
    if rank == 0:
        lists = [Path(cfg.out) / f"split-{dataset}.csv" for dataset, _ in loaded]
        parent = Path(cfg.model) / data.TRAINING_DATA
        lists += [p for p in (parent, Path(cfg.out) / data.TRAINING_DATA) if p.is_file()]
        rows = {tuple(row.values()): row for p in lists for row in data.load_image_list(str(p))}
        data.save_image_list(list(rows.values()), str(Path(cfg.out) / data.TRAINING_DATA))
    distributed.barrier()  # rank 0's split files are whole before anyone reads them
    for dataset, records in loaded:
        split = data.load_split(str(Path(cfg.out) / f"split-{dataset}.csv"))
        records = data.apply_split(records, split)
        train_sets[dataset] = [r for r in records if r.split == "train"]
        heldout += [r for r in records if r.split in ("val", "test")]
    return train_sets, heldout


def _by_dataset(records) -> dict:
    out = {}
    for r in records:
        out.setdefault(r.dataset, []).append(r)
    return out


def held_out_eval(cfg: Config, processor, heldout):
    """eval_fn for train: held-out SRCC per dataset and attribute on a seeded, stratified subset, in
    eval mode."""
    subset = data.stratified_subset(heldout, cfg.eval_limit, cfg.seed)

    def eval_fn(model, i):
        was_training = model.training
        model.eval()
        rows = evaluate.evaluate_records(model, processor, subset, thinking=cfg.thinking,
                                         max_new_tokens=cfg.max_new_tokens)
        model.train(was_training)
        summary = evaluate.summarize(rows, subset)["datasets"]
        return {name: {"n": d["n"], "unparsed": d["parse_failures"],
                       **{a: m["srcc"] for a, m in d["metrics"].items()}}
                for name, d in summary.items()}
    return eval_fn


# ----------------------------------------------------------------------------- one step, explained
# `python grpo.py --explain [-K 2] [--beta 0] [--credit attribute] ...` runs explain_step: one real
# grpo_step of the demo's tiny model after its answer-layout warm-up (assets/explain-model, written
# by `python demo.py --write-explain-model assets/explain-model`), on procedural scenes, printed
# quantity by quantity in the order of docs/METHOD.md, its equation numbers in brackets. The values
# printed are the step's own: `recording` wraps the functions grpo_step calls, keeping what
# they saw.

EXPLAIN_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "explain-model")
EXPLAIN_DEFAULTS = dict(model=EXPLAIN_MODEL, full=True, batch_size=2, num_generations=4,
                        max_new_tokens=20, lr=1e-4, gamma=0.05, seed=0)  # unless a flag is given
EXPLAIN_QUIET_STEPS = 2  # GRPO steps before the shown one: the policy has left the reference


@contextlib.contextmanager
def recording(trace: dict, functions):
    """While active, each (module, name) in functions also appends (args, result) of every call to
    trace[name]; the originals are put back on exit."""
    originals = []
    for module, name in functions:
        original = getattr(module, name)
        originals.append((module, name, original))
        setattr(module, name, _recorder(original, trace.setdefault(name, [])))
    try:
        yield trace
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _recorder(function, calls: list):
    def recorded(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append((args, result))
        return result
    return recorded


def explain_step(cfg: Config, model, processor, sampler, prompts_of, log=print,
                 record: bool = True) -> dict:
    """From `model` (full fine-tuning of its language model), EXPLAIN_QUIET_STEPS GRPO steps on
    sampler's batches, then one more, printed (record=False: the same steps, nothing recorded or
    printed). prompts_of(records) -> rollouts.Prompts. Returns the last step's figures (what
    grpo_step returned) and, recorded, what the functions it calls saw (trace)."""
    ref = None
    if cfg.beta > 0:  # the reference: the model as the warm-up left it (as --full's frozen copy)
        ref = distributed.wrap(copy.deepcopy(model).eval().requires_grad_(False), cfg.fsdp,
                               compute_dtype(cfg, "cpu"), cfg.shared_prefix)
    model.requires_grad_(True)
    model.model.visual.requires_grad_(False)  # as the demo's GRPO: the language model only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    tokens = Tokens.resolve(cfg, model, processor)
    policy = distributed.wrap(model, cfg.fsdp, compute_dtype(cfg, "cpu"), cfg.shared_prefix)
    me = sys.modules[__name__]
    watched = [(reward, "mg_reward"), (rollouts, "completion_mask"), (reward, "token_advantages"),
               (me, "clipped_surrogate"), (me, "k3_kl"), (me, "aggregate")]
    torch.manual_seed(cfg.seed)
    for step in range(EXPLAIN_QUIET_STEPS + 1):
        batch = sampler.sample()
        prompts = prompts_of(batch["records"])
        trace: dict = {}
        shown = record and step == EXPLAIN_QUIET_STEPS
        with recording(trace, watched if shown else []):
            figures = grpo_step(cfg, policy, processor, batch, prompts, optimizer, tokens,
                                ref=ref, reward_fn=reward.mg_reward)
        if record and not shown:
            log(f"(GRPO step {step + 1}, not shown: reward {figures['reward']:.3f}, "
                f"loss {figures['loss']:+.6f})")
    if record:
        print_step(cfg, processor, batch, prompts, trace, figures, log=log)
    return {"figures": figures, "trace": trace}


def _rows(values, fmt: str = "{:7.3f}") -> str:
    return " ".join(fmt.format(float(v)) for v in values)


def print_step(cfg: Config, processor, batch, prompts, trace, figures, log=print) -> None:
    """The step's quantities in the order of docs/METHOD.md, sections 1-3."""
    B, K, A = cfg.batch_size, cfg.num_generations, len(ATTRIBUTES)
    tok = processor.tokenizer
    (completions, P, M), rewards = trace["mg_reward"][0][0][:3], trace["mg_reward"][0][1]
    (ids, _), mask = trace["completion_mask"][0]
    attr, adv = trace["token_advantages"][0][0][1], trace["token_advantages"][0][1]
    line = "-" * 96
    log(f"One GRPO step, explained: B {B} images x K {K} rollouts, credit {cfg.credit}, "
        f"beta {cfg.beta}, gamma {cfg.gamma}, weights {cfg.weights}, w_format {cfg.w_format}")
    log(line)
    log("[1] The prompt (docs/METHOD.md section 1; image tokens abbreviated), one per image:")
    log(_abbreviated(tok.decode(prompts.input_ids[0][prompts.attention_mask[0].bool()])))
    log(line)
    log("[3.1] K completions per image (sampled at temperature "
        f"{cfg.temperature}) and their lenient scores [2.0] (" + ", ".join(ATTRIBUTES) + "):")
    scores = rewards["scores"]  # (B, K, A)
    for i, record in enumerate(batch["records"]):
        labels = ", ".join(f"{a} {record.attributes.get(a, math.nan):g}" for a in mgiqa.LABELLED)
        log(f"image {i}: {Path(record.image).name}  family {record.family or 'clean'} "
            f"level {record.level}  MOS {record.mos:g}  ({labels})")
        for k in range(K):
            log(f"  k={k}: {completions[i * K + k]!r}")
            log(f"        scores {_rows(scores[i, k], '{:5.2f}')}   format F = "
                f"{float(rewards['format'][i, k]):.0f}")
    log(line)
    log("[2.3, 2.4] Ground truth P[i, j] (1: i better, .5 tie, 0: worse) and mask M per attribute:")
    for a, name in enumerate(ATTRIBUTES):
        pairs = [f"P[{i},{j}] = {float(P[a, i, j]):.1f}{'' if M[a, i, j] else ' (masked)'}"
                 for i in range(B) for j in range(B) if i != j]
        log(f"  {name:12s} " + "; ".join(pairs))
    log(line)
    n, mu, var = reward.group_stats(scores.permute(2, 0, 1))  # (A, B) each
    p_hat = reward.thurstone_probability(scores.permute(2, 0, 1), mu, var, cfg.gamma)  # (A,B,B,K)
    log("[2.1] mean mu[i] and unbiased variance var[i] of each image's valid scores, "
        "[2.2] p_hat[i, j, k] = Phi((s[i,k] - mu[j]) / sqrt(var[i] + var[j] + gamma)), "
        "[2.6] fidelity reward r[i, k]:")
    for a, name in enumerate(ATTRIBUTES):
        log(f"  {name}: mu {_rows(mu[a])}  var {_rows(var[a])}")
        for i in range(B):
            for j in range(B):
                if i != j:
                    log(f"    p_hat[{i},{j},:] {_rows(p_hat[a, i, j])}")
            log(f"    r[{i},:]       {_rows(rewards['per_attribute'][i, :, a])}")
    log(line)
    log("[2.7] total R[i, k] = w_format F + sum_a w_a r_a, and [2.8] the group advantages "
        "A[i, k] = (R - mean_k R) / (std_k R + 1e-4):")
    group = reward.group_advantages(rewards["total"])
    for i in range(B):
        log(f"  image {i}: R {_rows(rewards['total'][i])}   A {_rows(group[i])}")
    log(line)
    log(f"[2.9] advantage on each completion token (credit {cfg.credit}); "
        "score tokens marked [attribute]:")
    for row in (0, K):  # the first rollout of the first two images
        shown = []
        for t in range(int(mask[row].sum())):
            piece = tok.decode([int(ids[row, t])])
            mark = f"[{ATTRIBUTES[int(attr[row, t])][:4]}]" if attr[row, t] >= 0 else ""
            shown.append(f"{piece!r}{mark} {float(adv[row, t]):+.3f}")
        log(f"  row {row}: " + "  ".join(shown))
    log(line)
    (logp, old, adv_rows, *_), (per_token, _) = trace["clipped_surrogate"][0]
    logp, per_token = logp.detach(), per_token.detach()
    rho = torch.exp(logp - old)
    kl = trace["k3_kl"][0][1].detach() if trace["k3_kl"] else torch.zeros_like(logp)
    ref_lp = trace["k3_kl"][0][0][1].detach() if trace["k3_kl"] else None
    log("[3.4, 3.5] per token: logp, reference logp, ratio rho = exp(logp - logp_old) (1 on the "
        "first update: logp_old is logp itself), the clipped surrogate -min(rho A, clip(rho) A) "
        "and k3 = exp(ref - logp) - (ref - logp) - 1, for the first tokens of row 0:")
    for t in range(min(8, int(mask[0].sum()))):
        ref_text = f"{float(ref_lp[0, t]):+.4f}" if ref_lp is not None else "   (none)"
        log(f"  token {tok.decode([int(ids[0, t])])!r:12} logp {float(logp[0, t]):+.4f}  "
            f"ref {ref_text}  rho {float(rho[0, t]):.4f}  A {float(adv_rows[0, t]):+.3f}  "
            f"surrogate {float(per_token[0, t]):+.4f}  k3 {float(kl[0, t]):.5f}")
    log(line)
    (_, _), loss = trace["aggregate"][0]
    log(f"[3.6] loss = {cfg.loss_type} mean of (surrogate + beta k3) over completion tokens "
        f"= {float(loss.detach()):+.6f}; entropy bonus {figures['entropy']:.4f} x "
        f"{cfg.entropy_coef}; "
        f"gradient norm before clipping to {cfg.grad_clip}: {figures['grad_norm']:.4f}")


def _abbreviated(text: str) -> str:
    """Runs of one repeated special token (the image's pads) written once with a count."""
    def counted(match) -> str:
        return f"{match.group(1)} x {len(match.group(0)) // len(match.group(1))}"
    return re.sub(r"(<\|[a-z_]+\|>)\1{2,}", counted, text)


def explain_config(argv) -> Config:
    """grpo.py's flags, EXPLAIN_DEFAULTS for every one not given."""
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    cfg = flagged_config(args)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in EXPLAIN_DEFAULTS.items() if k not in given})
    check_config(cfg)
    return cfg


def explain_inputs(cfg: Config):
    """(model, processor, sampler, prompts_of) of the step explained: cfg.model (by default the
    warmed-up assets/explain-model) and 400 procedural scenes in domain-pure batches."""
    import synth  # procedural scenes, as the demo's: imported only here
    from PIL import Image

    torch.manual_seed(cfg.seed)
    model, processor = mgiqa.load(cfg.model, device="cpu", dtype="float32", seed=cfg.seed)
    images, records = synth.synthesize(400, 84, cfg.seed, per_ref=5, heldout_frac=0.0)
    pixels = {r.image: image for r, image in zip(records, images)}

    def prompts_of(batch_records):
        scenes = [Image.fromarray(pixels[r.image]) for r in batch_records]
        return rollouts.encode_prompts(model, processor, scenes, mgiqa.prompt_text(processor))

    sampler = data.Sampler({records[0].dataset: records}, cfg.batch_size, seed=cfg.seed)
    return model, processor, sampler, prompts_of


def explain_main(argv) -> int:
    """python grpo.py --explain [flags]."""
    cfg = explain_config(argv)
    torch.set_num_threads(build_parser().parse_args(argv).threads or 2)  # same threads, same sums
    explain_step(cfg, *explain_inputs(cfg))
    return 0


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Every Config field as a flag (its default, type and help), grouped; plus --resume, --merge,
    --threads."""
    ap = argparse.ArgumentParser(
        description="GRPO with the multi-dimensional Thurstone reward (MG-IQA).")
    groups = {}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        name = meta.pop("group")
        if name not in groups:
            groups[name] = ap.add_argument_group(name)
        group = groups[name]
        flags = ["--" + f.name.replace("_", "-"), *([meta.pop("short")] if "short" in meta else [])]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in ("bool", bool):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default,
                               help=meta.pop("help"))
        else:
            kinds = {"int": int, "float": float, "str": str,
                     "list": float if f.name == "weights" else str}
            kind = kinds.get(f.type, str)
            group.add_argument(*flags, default=default, type=meta.pop("type", kind), **meta)
    run = groups["run"]
    run.add_argument("--resume", default=None,
                     help="run directory to continue (its config.json is used; other flags must "
                          "equal it except --steps, --save-every, --keep, --eval-every, "
                          "--eval-limit, --device, --threads, --merge)")
    run.add_argument("--merge", default=None,
                     help="LoRA: after training, also write the merged transformers checkpoint "
                          "here")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--explain", action="store_true",
                     help="instead of training: ONE step of a small warmed-up model, every "
                          "quantity of the paper's formulas printed (offline, seconds); other "
                          "flags change that step")
    return ap


# Flags a resumed run may change: they change no computation (how long, how often it saves and
# evaluates, which device); every other flag must equal the run's config.json.
RESUME_MAY_CHANGE = ("steps", "save_every", "keep", "eval_every", "eval_limit", "device")


def given_flags(argv=None) -> set[str]:
    """The Config fields (and --resume, --merge, --threads) the command line sets, not defaulted."""
    parser, unset = build_parser(), object()  # a default no command line can write
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


def flagged_config(args) -> Config:
    """The Config the parsed command line writes, field by field."""
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def config_from_args(args, given: set[str] = frozenset()) -> Config:
    """The run's settings: the flags, or with --resume the run's config.json, where the flags in
    `given` (given_flags) may change only RESUME_MAY_CHANGE. A --out that holds a run is refused
    without --resume: nothing is resumed by surprise."""
    cfg = flagged_config(args)
    if args.resume:
        cfg = resumed_config(args.resume, cfg, given)
    elif checkpoints(cfg.out) or (Path(cfg.out) / "config.json").is_file():
        sys.exit(f"error: --out {cfg.out} already holds a run ({', '.join(run_files(cfg.out))}); "
                 f"continue it with --resume {cfg.out} (--steps N to extend it), or start a new "
                 "run with another --out")
    try:
        check_config(cfg)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if not cfg.data:
        sys.exit("error: --data NAME=ROOT is required")
    if cfg.fsdp and not cfg.full:
        sys.exit("error: --fsdp shards full fine-tuning (--full); LoRA runs use DDP under torchrun")
    if cfg.fsdp and cfg.eval_every:
        sys.exit("error: --eval-every is not offered with --fsdp (rank 0 cannot score alone); "
                 "run evaluate.py on final/")
    if args.merge and cfg.full:
        sys.exit("error: --merge folds LoRA adapters in; a --full run already writes final/ as a "
                 "plain checkpoint")
    return cfg


def run_files(run_dir) -> list[str]:
    """What shows that run_dir holds a run: its config.json and checkpoints."""
    found = ["config.json"] if (Path(run_dir) / "config.json").is_file() else []
    return found + [f"checkpoint-{step}/" for step in checkpoints(run_dir)]


def resumed_config(run_dir, flagged: Config, given: set[str]) -> Config:
    """The run's config.json with the given flags of RESUME_MAY_CHANGE applied; any other given flag
    that differs from it is refused, naming each; --steps below the step reached is refused."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        sys.exit(f"error: --resume {run_dir}: no config.json there, not a run folder of grpo.py")
    names = [f.name for f in dataclasses.fields(Config)]
    saved = Config(**{k: v for k, v in json.loads(path.read_text()).items() if k in names})
    if "out" in given and Path(flagged.out) != Path(run_dir):
        sys.exit(f"error: --resume {run_dir} writes into {run_dir}; leave --out {flagged.out} out")
    differ = [f"--{k.replace('_', '-')} {getattr(flagged, k)!r} (the run has {getattr(saved, k)!r})"
              for k in names if k in given and k not in (*RESUME_MAY_CHANGE, "out")
              and getattr(flagged, k) != getattr(saved, k)]
    if differ:
        sys.exit(f"error: --resume {run_dir}: these flags differ from its config.json: "
                 f"{'; '.join(differ)}. A resumed run continues the same computation; start a new "
                 "run with another --out instead")
    changed = {k: getattr(flagged, k) for k in RESUME_MAY_CHANGE if k in given}
    cfg = dataclasses.replace(saved, out=str(run_dir), **changed)
    reached = max(checkpoints(run_dir), default=0)
    if cfg.steps < reached:
        sys.exit(f"error: --resume {run_dir} --steps {cfg.steps}: the run reached step {reached} "
                 f"({run_dir}/checkpoint-{reached}); --steps must be at least that")
    return cfg


def process_seed(seed: int, rank: int) -> int:
    """Each rank's sampling stream (batches and rollouts) differs; weights start identical."""
    return seed * 1000 + rank


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.explain:
        given = sys.argv[1:] if argv is None else argv
        return explain_main([a for a in given if a != "--explain"])
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args, given_flags(argv))
    device = distributed.init(cfg.fsdp)
    if device is not None:
        cfg.device = device
    rank = distributed.rank()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, processor, ref = build_model(cfg)
    torch.manual_seed(process_seed(cfg.seed, rank))
    train_sets, heldout = load_data(cfg, rank)
    sampler = data.Sampler(train_sets, cfg.batch_size, cfg.alpha, seed=process_seed(cfg.seed, rank))
    eval_fn = held_out_eval(cfg, processor, heldout) if cfg.eval_every and heldout else None
    train(cfg, model, processor, sampler, ref_model=ref, eval_fn=eval_fn)
    if args.merge and rank == 0:
        save_merged(model, processor, args.merge)
        carry_training_data(cfg.out, args.merge)
        print(f"merged checkpoint written to {args.merge}")
    if distributed.is_distributed():
        distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
