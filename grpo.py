"""GRPO for MG-IQA, written by hand: the configuration, the training loop, model building and the CLI.
One step (rollouts, reward, advantages, loss) is step.py; checkpoints checkpoint.py; several
processes parallel.py; the method and its equations docs/METHOD.md.

    python grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --data kadid=/data/kadid10k koniq=/data/koniq10k \
        --out runs/mgiqa --steps 2000                                   # LoRA on one GPU
    torchrun --nproc_per_node 8 grpo.py --model ... --data ... --out runs/mgiqa         # LoRA, DDP
    torchrun --nproc_per_node 8 grpo.py --model ... --full --fsdp --data ... --out runs/full   # all weights, FSDP2
    python grpo.py --resume runs/mgiqa                                  # continue exactly where it stopped

A run writes in --out: config.json, split-<name>.csv per dataset, log.jsonl (one line a step),
checkpoint-STEP/ (the last --keep), and final/ at the end: the LoRA adapter in PEFT's layout, or
with --full a plain transformers checkpoint (fp32 master weights) that evaluate.py and
from_pretrained open. --merge DIR also writes LoRA folded into the base weights.

Departures from VisualQuality-R1 (each off by default unless stated):
1. LoRA by default (lora.py; VisualQuality-R1 fine-tunes all weights; `--full` does that), reference policy =
   the same model with adapters disabled, LoRA dropout 0 (so rho = 1 exactly with one iteration).
2. Rollouts and the training forward share the prompt (rollouts.py): the vision tower and the prompt
   prefill run once per image, not K times (the same numbers as repeating; `--straightforward` repeats).
3. `--credit attribute`: each attribute's score tokens take that attribute's own group advantage,
   every other token the unnormalised format advantage F - mean_k F (default `sequence`: one
   advantage per completion, as VisualQuality-R1).
4. `--ignore-ties`: tied-label pairs left out of the fidelity mean (default: counted at P = 0.5).
5. `--entropy-coef`: an entropy bonus on the score tokens (default 0), over the distribution
   renormalised on the digit tokens (`--entropy-vocab`).
6. An auxiliary loss hook (`train(..., aux_loss=...)`), used by the demo only; it never sees quality labels.
7. Special tokens (<|image_pad|> ...) are masked out of sampling and of the training log-softmax.
8. Images are capped at 1,003,520 pixels (`--max-pixels`); Qwen's processors allow 12.8 MP.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import evaluate
import lora
import mgiqa
import parallel
import rollouts
import step
from step import compute_dtype, precision

DEFAULTS = dict(
    # model
    model="tiny",            # checkpoint folder or hub id; "tiny" / "small": mgiqa.tiny_vlm, offline
    full=False,              # fine-tune every weight (VisualQuality-R1) instead of LoRA
    fsdp=False,              # shard weights, gradients and AdamW states over the ranks (FSDP2; with --full)
    lora_rank=64, lora_alpha=128,  # LoRA r and alpha (scale alpha / r = 2)
    lora_dropout=0.0,        # 0: with one iteration per batch the ratio rho is exactly 1
    lora_vision=False,       # also put adapters on the vision tower
    dtype="auto",            # compute dtype: auto = bf16 on CUDA, fp32 on CPU; trainable state is always fp32
    device="auto",
    gradient_checkpointing=False,
    max_pixels=mgiqa.DEFAULT_MAX_PIXELS,  # 1280 x 28 x 28: at most 1,280 image tokens per image
    # data
    data=[],                 # NAME=ROOT per training dataset (data.READERS)
    batch_size=8,            # B images per step and rank, all from one dataset (VisualQuality-R1: 8 per GPU)
    alpha=0.5,               # a dataset is drawn with probability ~ n^alpha
    seed=0,
    # rollouts
    num_generations=6,       # K rollouts per image (VisualQuality-R1: 6)
    temperature=1.0, top_p=1.0,
    max_new_tokens=256,      # VisualQuality-R1: 256
    thinking=True,           # <think> reasoning before the answer; False: the answer only
    straightforward=False,   # repeat each prompt K times instead of sharing its prefill (reference path)
    force_length=False,      # never stop at EOS (timing: every completion max_new_tokens long)
    # reward
    w_format=1.0,            # weight of the strict-format reward
    weights=None,            # sharpness color noise composition overall; None = (.25, .25, .25, .25, 1)
    gamma=1e-6,              # added to the variance sum in the Thurstone probability
    ignore_ties=False,       # leave tied-label pairs out of the fidelity mean
    credit="sequence",       # sequence: one advantage per completion; attribute: per score token
    entropy_coef=0.0,        # entropy bonus on score tokens
    entropy_vocab="0123456789",  # the tokens that bonus's distribution is renormalised over
    # loss
    beta=0.04,               # k3 KL coefficient (VisualQuality-R1: 0.04)
    epsilon=0.2, epsilon_high=0.2,  # clip range of rho
    loss_type="grpo",        # grpo / bnpo / dr_grpo aggregation over tokens
    num_iterations=1,        # updates per batch of rollouts (rho = 1 on the first)
    # optimisation
    lr=None,                 # None: 1e-5 for LoRA (the README recipe), 1e-6 for --full (VisualQuality-R1)
    weight_decay=0.0, warmup_steps=0, schedule="constant",  # schedule: constant or cosine to 0
    grad_clip=1.0,
    micro_batch=0,           # images per forward/backward (0: all B); gradients equal the full batch's
    # run
    out="runs/mgiqa", steps=1000,
    save_every=100, keep=2,  # checkpoint every N steps; keep the last `keep`
    eval_every=0, eval_limit=200,  # held-out evaluation every N steps on a stratified subset of this size
)


def default_lr(cfg) -> float:
    return cfg["lr"] if cfg["lr"] is not None else (1e-6 if cfg["full"] else 1e-5)


def lr_lambda(cfg):
    def f(i):
        if i < cfg["warmup_steps"]:
            return (i + 1) / cfg["warmup_steps"]
        if cfg["schedule"] == "cosine":
            progress = (i - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


def process_seed(seed: int, rank: int) -> int:
    """Each rank's sampling stream (batches and rollouts) differs; weights start identical."""
    return seed * 1000 + rank


def format_line(i, s) -> str:
    attrs = " ".join(f"{a[:4]} {r:.3f}" for a, r in zip(mgiqa.ATTRIBUTES, s["reward_attr"]))
    srcc = " ".join(f"{x:+.2f}" for x in s["srcc"])
    return (f"step {i:5d} | reward {s['reward']:.3f} ({attrs}) | format {s['format']:.2f} | srcc {srcc} | "
            f"kl {s['kl']:.4f} clip {s['clip']:.3f} | len {s['length']:.1f} | "
            f"gen {s['gen_s']:.2f}s reward {s['reward_s']:.2f}s update {s['update_s']:.2f}s")


def _json(obj) -> str:
    return json.dumps(mgiqa.json_safe(obj), allow_nan=False, default=str)  # NaN -> null: strict JSON readers open it


def train(cfg, model, processor, sampler, images_of=None, ref_model=None, aux_loss=None, eval_fn=None, log=print,
          reward_fn=None):
    """The loop: resume from the newest checkpoint in cfg["out"] if there is one, then step until
    cfg["steps"], checkpointing every cfg["save_every"] steps; at the end final/ (checkpoint.export).
    images_of(records) -> images (paths or PIL) or encoded Prompts; eval_fn(model, step) -> dict,
    run on rank 0 while the others wait; reward_fn: reward.mg_reward unless given. Returns the history."""
    run_dir, rank = Path(cfg["out"]), parallel.rank()
    dtype = compute_dtype(cfg, next(model.parameters()).device)
    policy = parallel.wrap(model, cfg["fsdp"], dtype)
    ref = parallel.wrap(ref_model, cfg["fsdp"], dtype) if ref_model is not None else None
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=default_lr(cfg),
                                  weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    i = 0
    if checkpoint.checkpoints(run_dir):
        latest = run_dir / f"checkpoint-{checkpoint.checkpoints(run_dir)[-1]}"
        i = checkpoint.load(latest, policy, optimizer, scheduler, sampler)
        if rank == 0:
            log(f"resumed from {latest} at step {i}")
            _truncate_log(run_dir / "log.jsonl", i)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    images_of = images_of or (lambda records: [r.image for r in records])
    history = []
    while i < cfg["steps"]:
        batch = sampler.sample()
        stats = step.grpo_step(cfg, policy, processor, batch, images_of(batch["records"]), reward_fn, ref,
                                           aux_loss, optimizer)
        scheduler.step()
        i += 1
        stats.update(step=i, dataset=batch["dataset"], lr=scheduler.get_last_lr()[0])
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # this step's peak, this rank's GPU
            stats["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if eval_fn is not None and cfg["eval_every"] and (i % cfg["eval_every"] == 0 or i == cfg["steps"]):
            if rank == 0:
                with torch.no_grad(), precision(cfg, model):
                    stats["eval"] = eval_fn(model, i)
            parallel.barrier()
        if rank == 0:
            log(format_line(i, stats) + (f" | eval {_json(stats['eval'])}" if "eval" in stats else ""))
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(_json(stats) + "\n")
        if cfg["save_every"] and (i % cfg["save_every"] == 0 or i == cfg["steps"]):
            checkpoint.save(run_dir, i, policy, optimizer, scheduler, sampler, cfg, cfg["keep"])
        history.append(stats)
    checkpoint.export(policy, processor, run_dir / "final", cfg)
    return history


def _truncate_log(path: Path, i: int) -> None:
    """Drop log lines after the checkpoint we resume from, so no step is logged twice."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= i]
        path.write_text("".join(ln + "\n" for ln in lines))


def build_model(cfg):
    """(model, processor, reference model or None): LoRA (fp32 adapters on a base in the compute
    dtype) or --full (fp32 master weights, a frozen copy in the compute dtype as reference unless beta = 0)."""
    device = mgiqa._resolve_device(cfg["device"])
    dtype = compute_dtype(cfg, device)
    weights = torch.float32 if cfg["full"] else dtype
    if cfg["model"] in mgiqa.SIZES:
        model, processor = mgiqa.tiny_vlm(cfg["seed"], cfg["model"])
        mgiqa.cap_pixels(processor.image_processor, cfg["max_pixels"])
        model = model.to(device=device, dtype=weights)
    else:
        model, processor = mgiqa.load(cfg["model"], str(device), str(weights).removeprefix("torch."), max_pixels=cfg["max_pixels"])
    if model.config.model_type not in mgiqa.TRAINABLE_MODEL_TYPES:
        raise ValueError(f"{cfg['model']}: grpo.py trains {', '.join(mgiqa.TRAINABLE_MODEL_TYPES)} models, not "
                         f"{model.config.model_type!r} (mgiqa.py and evaluate.py score it)")
    if device.type == "cpu":
        rollouts.fast_vision(model)  # exact and cheap on the CPU; on CUDA the stock attention kernels
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True
    ref = None
    if cfg["full"]:
        if cfg["beta"] > 0:
            ref = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        model.requires_grad_(True)
    else:
        lora.add_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], vision=cfg["lora_vision"])
    return model, processor, ref


def load_data(cfg, rank=0):
    """Training and held-out records from --data NAME=ROOT[,FILE][,KEY=VALUE] (data.parse_spec), one
    training set per dataset the records name; each dataset's split is written to the run dir."""
    train_sets, heldout = {}, []
    for spec in cfg["data"]:
        try:
            name, root, opts = data.parse_spec(spec)
        except ValueError as err:
            raise SystemExit(f"error: --data: {err}") from None
        for dataset, records in _by_dataset(data.load_dataset(name, root, **opts)).items():
            if dataset in train_sets:
                raise SystemExit(f"error: --data {spec!r}: dataset {dataset!r} is given twice")
            records = data.split_records(records, seed=cfg["seed"])
            split_path = Path(cfg["out"]) / f"split-{dataset}.csv"
            if split_path.is_file():  # a resumed or evaluated run keeps its images
                records = data.apply_split(records, data.load_split(str(split_path)))
            elif rank == 0:
                split_path.parent.mkdir(parents=True, exist_ok=True)
                data.save_split(records, str(split_path))
            train_sets[dataset] = [r for r in records if r.split == "train"]
            heldout += [r for r in records if r.split in ("val", "test")]
    parallel.barrier()
    return train_sets, heldout


def _by_dataset(records) -> dict:
    out = {}
    for r in records:
        out.setdefault(r.dataset, []).append(r)
    return out


def held_out_eval(cfg, processor, heldout):
    """eval_fn for train: held-out SRCC per dataset and attribute on a seeded, stratified subset, in eval mode."""
    subset = data.stratified_subset(heldout, cfg["eval_limit"], cfg["seed"])

    def eval_fn(model, i):
        was_training = model.training
        model.eval()
        rows = evaluate.evaluate_records(model, processor, subset, thinking=cfg["thinking"], max_new_tokens=cfg["max_new_tokens"])
        model.train(was_training)
        summary = evaluate.summarize(rows, subset)["datasets"]
        return {name: {"n": d["n"], "unparsed": d["parse_failures"], **{a: m["srcc"] for a, m in d["metrics"].items()}}
                for name, d in summary.items()}
    return eval_fn


def parse_args(argv=None):
    d = DEFAULTS
    ap = argparse.ArgumentParser(description="GRPO with the multi-dimensional Thurstone reward (MG-IQA).")
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=d["model"], help="checkpoint folder or hub id; 'tiny' / 'small' for mgiqa.tiny_vlm")
    g.add_argument("--full", action="store_true", help="fine-tune all weights (frozen reference copy) instead of LoRA")
    g.add_argument("--fsdp", action="store_true", help="with --full, under torchrun: shard weights, gradients and AdamW states (FSDP2)")
    g.add_argument("--lora-rank", type=int, default=d["lora_rank"], help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=d["lora_alpha"], help="LoRA alpha (scale alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=d["lora_dropout"], help="LoRA dropout (0 keeps rho = 1)")
    g.add_argument("--lora-vision", action="store_true", help="also put adapters on the vision tower")
    g.add_argument("--dtype", default=d["dtype"], help="compute dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    g.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:1 (torchrun sets each rank's)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--max-pixels", type=int, default=d["max_pixels"], help="pixel cap per image (default 1,003,520 = 1280 x 28 x 28)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", nargs="*", default=d["data"], help="NAME=ROOT for each training dataset (data.py names)")
    g.add_argument("--batch-size", "-B", type=int, default=d["batch_size"], help="images per step (per rank)")
    g.add_argument("--alpha", type=float, default=d["alpha"], help="dataset drawn with probability ~ n^alpha")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of weights, splits, sampler and rollouts")
    g = ap.add_argument_group("rollouts")
    g.add_argument("--num-generations", "-K", type=int, default=d["num_generations"], help="rollouts per image")
    g.add_argument("--temperature", type=float, default=d["temperature"], help="sampling temperature")
    g.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling (1: off)")
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="longest completion")
    g.add_argument("--fast", dest="thinking", action="store_false", help="answer-only prompt (no reasoning)")
    g.add_argument("--straightforward", action="store_true", help="repeat each prompt K times (the reference path)")
    g.add_argument("--force-length", action="store_true", help="never stop at EOS (timing runs)")
    g = ap.add_argument_group("reward")
    g.add_argument("--w-format", type=float, default=d["w_format"], help="weight of the strict-format reward")
    g.add_argument("--weights", type=float, nargs=5, default=d["weights"], metavar="W",
                   help="weights of sharpness color noise composition overall (default .25 .25 .25 .25 1)")
    g.add_argument("--gamma", type=float, default=d["gamma"], help="variance floor of the Thurstone probability")
    g.add_argument("--ignore-ties", action="store_true", help="leave tied-label pairs out of the fidelity mean")
    g.add_argument("--credit", choices=("sequence", "attribute"), default=d["credit"],
                   help="sequence: one advantage per completion; attribute: each score token its attribute's")
    g.add_argument("--entropy-coef", type=float, default=d["entropy_coef"], help="entropy bonus on score tokens")
    g.add_argument("--entropy-vocab", default=d["entropy_vocab"], help="the tokens (characters) the entropy bonus is taken over")
    g = ap.add_argument_group("loss")
    g.add_argument("--beta", type=float, default=d["beta"], help="k3 KL coefficient")
    g.add_argument("--epsilon", type=float, default=d["epsilon"], help="lower clip range of rho")
    g.add_argument("--epsilon-high", type=float, default=d["epsilon_high"], help="upper clip range of rho")
    g.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo"), default=d["loss_type"], help="token aggregation")
    g.add_argument("--num-iterations", type=int, default=d["num_iterations"], help="updates per batch of rollouts")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate (default 1e-5 LoRA, 1e-6 --full)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="linear learning-rate warm-up steps")
    g.add_argument("--schedule", choices=("constant", "cosine"), default=d["schedule"], help="learning rate after warm-up")
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="gradient norm clip")
    g.add_argument("--micro-batch", type=int, default=d["micro_batch"], help="images per micro-batch (0: all)")
    g = ap.add_argument_group("run")
    g.add_argument("--steps", type=int, default=d["steps"], help="training steps")
    g.add_argument("--out", default=d["out"], help="run directory (checkpoints, log.jsonl, final/)")
    g.add_argument("--save-every", type=int, default=d["save_every"], help="checkpoint every N steps")
    g.add_argument("--keep", type=int, default=d["keep"], help="checkpoints kept")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="held-out evaluation every N steps (0: never)")
    g.add_argument("--eval-limit", type=int, default=d["eval_limit"], help="images in that evaluation, drawn from every dataset")
    g.add_argument("--resume", default=None, help="run directory to continue (its config.json is used)")
    g.add_argument("--merge", default=None, help="LoRA: after training, also write the merged transformers checkpoint here")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap.parse_args(argv)


def config(args) -> dict:
    """The run's settings: the flags, or with --resume the saved config.json (--steps may extend it)."""
    cfg = {**DEFAULTS, **{k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}}
    if args.resume:
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        cfg = {**DEFAULTS, **saved, "out": args.resume,
               "steps": max(saved["steps"], args.steps if args.steps != DEFAULTS["steps"] else 0)}
    if not cfg["data"]:
        sys.exit("error: --data NAME=ROOT is required")
    if cfg["fsdp"] and not cfg["full"]:
        sys.exit("error: --fsdp shards full fine-tuning (--full); LoRA runs use DDP under torchrun")
    if cfg["fsdp"] and cfg["eval_every"]:
        sys.exit("error: --eval-every is not offered with --fsdp (rank 0 cannot score alone); run evaluate.py on final/")
    if args.merge and cfg["full"]:
        sys.exit("error: --merge folds LoRA adapters in; a --full run already writes final/ as a plain checkpoint")
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config(args)
    device = parallel.init(cfg["fsdp"])
    if device is not None:
        cfg["device"] = device
    rank = parallel.rank()
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    model, processor, ref = build_model(cfg)
    torch.manual_seed(process_seed(cfg["seed"], rank))
    train_sets, heldout = load_data(cfg, rank)
    sampler = data.Sampler(train_sets, cfg["batch_size"], cfg["alpha"], seed=process_seed(cfg["seed"], rank))
    eval_fn = held_out_eval(cfg, processor, heldout) if cfg["eval_every"] and heldout else None
    train(cfg, model, processor, sampler, ref_model=ref, eval_fn=eval_fn)
    if args.merge and rank == 0:
        checkpoint.save_merged(model, processor, args.merge)
        print(f"merged checkpoint written to {args.merge}")
    if parallel.is_distributed():
        parallel.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
