"""The GPU check, through the entry points users call: grpo.main (LoRA GRPO steps with gradient
checkpointing, --merge), then evaluate.main on the merged checkpoint. Prints one JSON line per event.

    python scripts/gpu_check.py                              # Qwen2.5-VL-7B architecture, one GPU (< 10 min on an H200)
    python scripts/gpu_check.py --config qwen3-vl-8b         # Qwen3-VL-8B (deepstack, 32 px tokens)
    python scripts/gpu_check.py --config qwen3-vl-4b -B 4 -K 6 --max-pixels 262144 --micro-batch 2   # the 24 GB recipe
    python scripts/gpu_check.py --model /ckpt/Qwen2.5-VL-7B-Instruct  # real weights from a local folder
    python scripts/gpu_check.py --config tiny-qwen2.5-vl     # the same code on the CPU (the test suite runs it)

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

import evaluate  # noqa: E402
import grpo  # noqa: E402
import tiny  # noqa: E402

# Published config.json values of each architecture (text model, vision tower). Special-token ids
# and the processor come from the family's fixture (tiny.real_processor), as in the real checkpoints.
QWEN25_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                      tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
QWEN25_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_ROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5000000.0}
QWEN3_TEXT = {
    "qwen3-vl-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen3-vl-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-vl-2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
QWEN3_VISION = {
    "qwen3-vl-8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24]),
    "qwen3-vl-4b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17]),
    "qwen3-vl-2b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17]),
}
CONFIGS = ("qwen2.5-vl-7b", *QWEN3_TEXT, "tiny-qwen2.5-vl", "tiny-qwen3-vl")


def build(name: str, device: torch.device, out: str) -> None:
    """The architecture `name` with random bf16 weights and its family's real processor, saved to `out`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if name.startswith("tiny-"):
        tiny.save(name, out, seed=0)
        return
    family = "tiny-qwen2.5-vl" if name.startswith("qwen2.5") else "tiny-qwen3-vl"
    processor = tiny.real_processor(family)
    ids = {k: processor.tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("start", "<|vision_start|>"), ("end", "<|vision_end|>"),
        ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    special = dict(bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    tokens = dict(image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
                  vision_end_token_id=ids["end"])
    if name == "qwen2.5-vl-7b":
        config = Qwen2_5_VLConfig(text_config={**QWEN25_TEXT_7B, **special}, vision_config=QWEN25_VISION_7B,
                                  tie_word_embeddings=False, **tokens, **special)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        text = {**QWEN3_TEXT[name], "vocab_size": 151936, "rope_parameters": QWEN3_ROPE, "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6, **special}
        vision = {**QWEN3_VISION[name], "out_hidden_size": text["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "num_position_embeddings": 2304}
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                               **tokens, **special)
        cls = Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["pad"], ids["eos"], ids["pad"]
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
    ap.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temporary one)")
    args = ap.parse_args(argv)

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
                      "--save-every", "1", "--keep", "1", "--merge", merged])
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
