"""Timing of grpo.py's GRPO step: the shared-prefix path (the default) against the plain one.

    python scripts/bench.py --model small --image-size 448 -B 2 -K 6 --new-tokens 64 --steps 3 --threads 2

shared (Config.shared_prefix, the default): rollouts prefill each image's prompt once and sample its
K completions from the expanded KV cache; the training forward packs [prompt, K completions] into
one row per image (rollouts.hidden_shared). plain (--no-shared-prefix, the path the equations
describe): every prompt repeated K times before the vision tower, B*K rows prefilled and trained on.

Each path runs in its own subprocess (peak memory is per process) with the same torch thread
count, on one fixed synthetic batch (random images, random labels), LoRA as grpo's defaults, every
completion forced to exactly --new-tokens tokens; one warm-up step, then --steps timed steps of
grpo.grpo_step. Prints one JSON line per path (path, sec_per_step, gen_s, reward_s, update_s,
peak_mem_mib: RSS high-water mark on CPU, torch.cuda.max_memory_allocated on GPU; times are medians over
the steps: this machine's speed drifts by 20% within a minute), then
{"ratio": shared sec_per_step / plain sec_per_step}. fused-decoding: the shared path with torch's
fused attention kernel for the one-token decoding steps on the CPU instead of the math kernel
(rollouts.one_query_attention); its line is followed by {"decoding_ratio": shared gen_s /
fused-decoding gen_s}. whole-prompt: the shared path with every row's instruction run in its own row
(rollouts.shared_instruction 0); then {"instruction_ratio": shared update_s / whole-prompt update_s}.
The demo's shape:

    python scripts/bench.py --model demo --image-size 84 -B 16 -K 8 --new-tokens 20 --steps 10
"""
import argparse
import contextlib
import os
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
PATHS = ("shared", "plain", "fused-decoding", "whole-prompt")


def run_path(args) -> dict:
    """One path, in this process: warm-up step, then args.steps timed steps."""
    import distributed
    import grpo
    import mgiqa
    import rollouts
    from mgiqa import ATTRIBUTES
    from PIL import Image
    from reward import preference_matrix

    torch.set_num_threads(args.threads)
    if args.path == "fused-decoding":  # the kernel torch picks by itself, in the decoding steps too
        rollouts.one_query_attention = lambda device: contextlib.nullcontext()
    if args.path == "whole-prompt":  # the instruction before the image run in every row
        rollouts.shared_instruction = lambda model, p: 0
    cfg = grpo.Config(model=args.model, batch_size=args.batch_size, num_generations=args.num_generations,
                      max_new_tokens=args.new_tokens, force_length=True, shared_prefix=args.path != "plain",
                      device=args.device, seed=0)
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    rng = np.random.default_rng(0)
    S, B = args.image_size, args.batch_size
    images = [Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)) for _ in range(B)]
    labels = torch.tensor(rng.uniform(1, 5, (len(ATTRIBUTES), B)))
    P, M = (torch.stack(t) for t in zip(*(preference_matrix(y) for y in labels)))  # (A, B, B) each, on the CPU:
    device = next(model.parameters()).device
    batch = grpo.to_device({"P": P, "M": M}, device)  # as the training loop does
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
    policy = distributed.wrap(model, False, grpo.compute_dtype(cfg, device), cfg.shared_prefix)
    ref = distributed.wrap(ref, False, grpo.compute_dtype(cfg, device), cfg.shared_prefix) if ref is not None else None
    tokens = grpo.Tokens.resolve(cfg, model, processor)
    prompts = rollouts.encode_prompts(model, processor, images, mgiqa.prompt_text(processor, cfg.thinking))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, parts = [], {"gen_s": [], "reward_s": [], "update_s": []}
    for i in range(args.steps + 1):  # step 0 warms up (allocator, lazy imports, kernels)
        sync()
        t0 = time.perf_counter()
        stats = grpo.grpo_step(cfg, policy, processor, batch, prompts, optimizer, tokens, ref=ref)
        sync()
        if stats["length"] != args.new_tokens:
            raise RuntimeError(f"bench.py: completions averaged {stats['length']} tokens, expected {args.new_tokens}")
        if i > 0:
            times.append(time.perf_counter() - t0)
            for k in parts:
                parts[k].append(stats[k])
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": args.path, "sec_per_step": round(float(np.median(times)), 3),
            **{k: round(float(np.median(v)), 3) for k, v in parts.items()}, "peak_mem_mib": round(peak, 1),
            "device": "cuda" if cuda else f"cpu x{args.threads} threads", "steps": args.steps}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Time grpo.py's shared-prefix GRPO step against the plain one.")
    ap.add_argument("--model", default="small", help="an offline model name (tiny.NAMES) or a checkpoint folder")
    ap.add_argument("--image-size", type=int, default=448, help="square image side, pixels")
    ap.add_argument("--batch-size", "-B", type=int, default=2, help="images per step")
    ap.add_argument("--num-generations", "-K", type=int, default=6, help="rollouts per image")
    ap.add_argument("--new-tokens", type=int, default=64, help="every completion is exactly this long")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same for both paths")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--path", choices=PATHS, default=None, help="run one path in this process (what the parent spawns)")
    return ap.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.path:
        print(json.dumps(run_path(args)), flush=True)
        return 0
    results = {}
    for path in PATHS:
        proc = subprocess.run([sys.executable, __file__, *argv, "--path", path], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            sys.exit(f"bench.py: the {path} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[path] = json.loads(lines[-1])
        print(lines[-1], flush=True)
    print(json.dumps({"ratio": round(results["shared"]["sec_per_step"] / results["plain"]["sec_per_step"], 3)}))
    print(json.dumps({"decoding_ratio": round(results["shared"]["gen_s"] / results["fused-decoding"]["gen_s"], 3)}))
    print(json.dumps({"instruction_ratio": round(results["shared"]["update_s"] / results["whole-prompt"]["update_s"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
