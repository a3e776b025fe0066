"""GRPO for MG-IQA, written by hand: the loss, checkpoints, the loop. Rollouts and per-token
log-probs are in rollouts.py, LoRA (no peft) in lora.py.

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
1. LoRA by default (lora.py; VisualQuality-R1 fine-tunes all weights; `--full` does that), reference policy =
   the same model with adapters disabled, LoRA dropout 0 (so rho = 1 exactly with one iteration).
2. Rollouts and the training forward share the prompt (rollouts.py): the vision tower and the prompt prefill run
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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import lora
import mgiqa
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
    decoded = {}  # token id -> its text: a batch has few distinct tokens (decode was 8% of a demo step)
    for r, (row, m) in enumerate(zip(ids.tolist(), mask.tolist())):
        for t in set(row) - decoded.keys():
            decoded[t] = tokenizer.decode([t])
        pieces = [decoded[t] if keep else "" for t, keep in zip(row, m)]
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
        lora.save_adapter(model, tmp / "adapter", cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["model"])
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
        lora.load_adapter_weights(model, path / "adapter")
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


class PolicyLogprobs(nn.Module):
    """completion_logprobs as a module, so DistributedDataParallel can wrap it and sync gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return rollouts.completion_logprobs(self.model, *args, **kwargs)


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

    B, K = (images.input_ids.shape[0] if isinstance(images, rollouts.Prompts) else len(images)), cfg["num_generations"]
    eos, banned, pad = mgiqa.eos_ids(model, processor), mgiqa.banned_token_ids(processor), processor.tokenizer.pad_token_id
    shared = not cfg["straightforward"]
    t0 = time.perf_counter()
    model.eval()
    p = images if isinstance(images, rollouts.Prompts) else rollouts.encode_prompts(model, processor, images, cfg["thinking"])
    ids = rollouts.rollout(model, p, K, cfg["max_new_tokens"], eos, pad, banned, cfg["temperature"], cfg["top_p"],
                           shared_prefix=shared, force_length=cfg["force_length"])  # (B*K, Tc)
    mask = rollouts.completion_mask(ids, eos)
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
        return rollouts.completion_logprobs(m, rollouts.select(p, g), K, ids[rows_of(g)], mask[rows_of(g)], cfg["temperature"],
                                            banned, shared, entropy=entropy)

    with torch.no_grad():
        ref = None
        if cfg["beta"] > 0:
            if ref_model is not None:
                ref = torch.cat([logprobs(ref_model, g) for g in groups])
            else:
                with lora.adapters_disabled(model):
                    ref = torch.cat([logprobs(model, g) for g in groups])
        old = torch.cat([logprobs(model, g) for g in groups]) if cfg["num_iterations"] > 1 else None
    stats = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "entropy": 0.0}
    for _ in range(cfg["num_iterations"]):
        optimizer.zero_grad(set_to_none=True)
        for gi, g in enumerate(groups):
            rows, weight = rows_of(g), len(g) / B
            sync = contextlib.nullcontext() if gi == len(groups) - 1 or not hasattr(policy, "no_sync") else policy.no_sync()
            with sync:
                out = policy(rollouts.select(p, g), K, ids[rows], mask[rows], cfg["temperature"], banned, shared,
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
    rollouts.fast_vision(model)
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True
    ref = None
    if cfg["full"]:
        if cfg["beta"] > 0:
            ref = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        lora.add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], vision=cfg["lora_vision"])
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
    lora.merge_lora(model)
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
