"""The GPU check, through the entry points users call: grpo.main (LoRA GRPO steps with gradient
checkpointing, --merge), then evaluate.main on the merged checkpoint. Prints one JSON line per event.

    python scripts/gpu_check.py                              # Qwen2.5-VL-7B architecture, one GPU (< 10 min on an H200)
    python scripts/gpu_check.py --config qwen3-vl-8b         # Qwen3-VL-8B (deepstack, 32 px tokens)
    python scripts/gpu_check.py --config qwen3-vl-4b -B 4 -K 6 --max-pixels 262144 --micro-batch 2   # the 24 GB recipe
    python scripts/gpu_check.py --model /ckpt/Qwen2.5-VL-7B-Instruct  # real weights from a local folder
    python scripts/gpu_check.py --config tiny-qwen2.5-vl     # the same code on the CPU (the test suite runs it)
    python scripts/gpu_check.py --predicted docs/fit/qwen2.5-vl-7b-b8.json   # beside fit.py's

The model: with --model, a local checkpoint; otherwise the architecture of --config built from its
published config.json values (written out below) with random weights in bf16 (normal 0.02, norms 1)
and the REAL processor of its family (tests/fixtures: Qwen's tokenizer, chat template and image
settings), saved as a checkpoint folder. Data: one domain of B photo-sized images, B-1 of 512x384
(KADID-10k's size) and one of 4000x3000 (a SPAQ original, capped to 1,280 image tokens), so every
batch carries realistic prompt and image token counts. Settings as the README's recipe: LoRA rank 64,
K rollouts, --max-new-tokens with EOS allowed (a random model rarely writes it, so most rows run the
whole budget), gradient checkpointing, bf16. Random weights write no parsable answer: the figures are
time and memory, not learning.

Printed: per step and phase (sampling, reward, reference, update, save) the seconds and peak GPU
memory; tokens per second; and an MFU estimate (model FLOPs / (seconds x the GPU's dense bf16 peak,
--peak-tflops)), where FLOPs = 2 N per token forward (rollout, reference) and 6 N per trained token
(forward, the forward recomputed under gradient checkpointing, and backward through the activations;
LoRA computes no weight gradient of the frozen N), N the language model's parameters. An estimate:
it leaves out attention's T^2 terms, the vision tower and the adapters.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # architectures.py

import architectures  # noqa: E402  (scripts/, this file's folder)
import evaluate  # noqa: E402
import grpo  # noqa: E402
import tiny  # noqa: E402

# The architectures (published config.json values, and where they come from):
# scripts/architectures.py, the one place that this script and scripts/fit.py both read.
CONFIGS = architectures.NAMES


def build(name: str, device: torch.device, out: str) -> None:
    """The architecture `name` with random bf16 weights and its family's real processor, saved to `out`."""
    from transformers import AutoModelForImageTextToText

    if name in architectures.TINY:
        tiny.save(name, out, seed=0)
        return
    processor = tiny.real_processor(architectures.family(name))
    config = architectures.published(name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    model.tie_weights()  # to_empty gives a tied LM head its own tensor (Qwen3-VL-2B / 4B tie theirs)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
    gc = model.generation_config
    ids = architectures.SPECIAL
    gc.bos_token_id, gc.eos_token_id = ids["bos_token_id"], ids["eos_token_id"]
    gc.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(out)  # rope buffers are not saved: from_pretrained rebuilds them
    processor.save_pretrained(out)


def make_data(root: str, B: int, big=(4000, 3000), small=(512, 384)) -> None:
    """A manifest dataset: B training images (B-1 of `small`, one of `big`) and two held-out ones."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i, (w, h) in enumerate([small] * (B - 1) + [big] + [small] * 2):
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # smooth, photo-like blocks
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(os.path.join(root, f"img{i}.jpg"), quality=90)
        rows.append([f"img{i}.jpg", f"{rng.uniform(1, 5):.2f}", "train" if i < B else "test"])
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["image", "mos", "split"], *rows])


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def language_parameters(model_dir: str) -> int:
    """N of the MFU estimate: the language model's parameters (embeddings excluded: a lookup, not a matmul)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir).get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size  # + the LM head


# what a fit.py prediction must share with this run to be compared with it (fit.py's JSON "config")
MATCHED = {"batch_size": "-B", "num_generations": "-K", "max_new_tokens": "--max-new-tokens",
           "max_pixels": "--max-pixels", "micro_batch": "--micro-batch"}


def load_prediction(path: str, args) -> dict:
    """fit.py --json-out's file, checked to describe this run (architecture, batch, tokens, pixels,
    micro-batch, images; LoRA rank 64, gradient checkpointing, bf16); an error names each
    difference."""
    with open(path) as f:
        pred = json.load(f)
    cfg = pred["config"]
    want = {"batch_size": args.batch_size, "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels,
            "micro_batch": args.micro_batch}
    bad = [f"{MATCHED[k]} {want[k]} (the prediction's {cfg[k]})"
           for k in MATCHED if cfg[k] != want[k]]
    if pred["model"] != (args.model or args.config):
        bad.append(f"--config {args.model or args.config} (the prediction's {pred['model']})")
    if pred["images"] != "gpu_check":
        bad.append(f"images {pred['images']} (this script trains on gpu_check's)")
    recipe = (not cfg["full"], cfg["lora_rank"], cfg["gradient_checkpointing"], cfg["dtype"])
    if recipe != (True, 64, True, "bfloat16"):
        bad.append("the prediction is not LoRA rank 64 with gradient checkpointing in bf16")
    if bad:
        raise SystemExit(f"gpu_check.py: --predicted {path} is for another configuration: "
                         + "; ".join(bad))
    return pred


def predicted_vs_measured(pred: dict, phases: dict) -> dict:
    """Per phase fit.py's predicted GiB beside the step's measured max_memory_allocated GiB."""
    out = {}
    for name, f in pred["predicted"].items():
        measured = phases.get(name, {}).get("peak_gib")
        predicted = f["peak"] / 2**30
        ratio = None if measured is None else round(measured / predicted, 3)
        out[name] = {"predicted_gib": round(predicted, 2),
                     "measured_gib": None if measured is None else round(measured, 2),
                     "measured_over_predicted": ratio}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Timed GRPO steps and evaluation of a Qwen-VL through grpo.main and evaluate.main.")
    ap.add_argument("--config", choices=CONFIGS, default="qwen2.5-vl-7b", help="architecture to build with random weights")
    ap.add_argument("--model", default=None, help="a local checkpoint folder to use instead (its weights and processor)")
    ap.add_argument("--batch-size", "-B", type=int, default=8, help="images per step (one domain)")
    ap.add_argument("--num-generations", "-K", type=int, default=6, help="rollouts per image")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="completion budget (EOS allowed)")
    ap.add_argument("--max-pixels", type=int, default=0, help="pixel cap (0: 1,280 image tokens of the family's size)")
    ap.add_argument("--micro-batch", type=int, default=0, help="images per training forward (0: all B)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps (the first includes warm-up costs)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak for the MFU estimate (H100/H200: 989)")
    ap.add_argument("--predicted", default=None,
                    help="fit.py --json-out's file for this configuration: its per-phase peaks "
                         "beside the measured ones (every completion then runs the whole budget)")
    ap.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temporary one)")
    args = ap.parse_args(argv)
    pred = load_prediction(args.predicted, args) if args.predicted else None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda, work, t0 = device.type == "cuda", args.work or tempfile.mkdtemp(prefix="gpu_check_"), time.perf_counter()
    B, K, T = args.batch_size, args.num_generations, args.max_new_tokens
    model_dir = args.model or os.path.join(work, "model")
    if not args.model:
        build(args.config, device, model_dir)
    make_data(os.path.join(work, "data"), B)
    emit({"event": "built", "seconds": round(time.perf_counter() - t0, 1), "device": str(device), "config": args.model or args.config,
          "gpu": torch.cuda.get_device_name() if cuda else None, "work": work})
    run, merged = os.path.join(work, "run"), os.path.join(work, "merged")
    t = time.perf_counter()
    code = grpo.main(["--model", model_dir, "--data", f"manifest={os.path.join(work, 'data')}", "--out", run,
                      "--steps", str(args.steps), "-B", str(B), "-K", str(K), "--max-new-tokens", str(T),
                      "--max-pixels", str(args.max_pixels), "--micro-batch", str(args.micro_batch), "--gradient-checkpointing", "--dtype", "bfloat16" if cuda else "float32",
                      "--save-every", "1", "--keep", "1", "--merge", merged,
                      *(["--force-length"] if pred else [])])  # fit.py's shapes: full length
    if code:
        raise SystemExit(f"gpu_check.py: grpo.main exited {code}")
    steps = [json.loads(ln) for ln in open(os.path.join(run, "log.jsonl"))]
    N = language_parameters(model_dir)
    for s in steps:
        prompt_rows = B * s["prompt_tokens"]
        generated = B * K * s["length"]
        trained = prompt_rows + generated  # the packed training forward: each prompt once, K completions
        flops = 2 * N * (prompt_rows + generated) + 2 * N * trained + 6 * N * trained
        seconds = sum(p["s"] for name, p in s["phases"].items() if name != "save_previous")
        emit({"event": "step", "step": s["step"], "prompt_tokens": s["prompt_tokens"], "image_tokens": s["image_tokens"],
              "completion_tokens": s["length"], "phases": {k: {q: round(v, 2) for q, v in p.items()} for k, p in s["phases"].items()},
              "tokens_per_s": round((prompt_rows + generated) / seconds, 1),
              "mfu_estimate": round(flops / (seconds * args.peak_tflops * 1e12), 4) if cuda else None})
    if pred:  # the last step: optimizer state and gradients already there, as fit.py measures
        emit({"event": "fit", "step": steps[-1]["step"], "fit_file": args.predicted,
              "phases": predicted_vs_measured(pred, steps[-1]["phases"])})
    emit({"event": "train", "seconds": round(time.perf_counter() - t, 1), "steps": len(steps), "B": B, "K": K,
          "max_new_tokens": T, "language_parameters": N})
    t = time.perf_counter()
    code = evaluate.main(["--model", merged, "--data", f"manifest={os.path.join(work, 'data')}", "--split", "test",
                          "--out", os.path.join(work, "eval"), "--max-new-tokens", "64", "--batch-size", "2"])
    emit({"event": "evaluate", "exit": code, "seconds": round(time.perf_counter() - t, 1)})
    if code:
        raise SystemExit(f"gpu_check.py: evaluate.main exited {code}")
    emit({"event": "done", "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
