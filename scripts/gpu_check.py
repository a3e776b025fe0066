"""The GPU check, through the entry points users call: grpo.main (a few LoRA GRPO steps, --merge),
then evaluate.main on the merged checkpoint, then mgiqa.main on one photo. Prints JSON lines.

    python scripts/gpu_check.py                                 # Qwen2.5-VL-7B architecture, one GPU (< 10 min)
    torchrun --nproc_per_node 1 scripts/gpu_check.py --fsdp --layers 12   # --full --fsdp, no reference (beta 0)
    python scripts/gpu_check.py --tiny                          # a small config on the CPU (in the test suite)

The model: Qwen2.5-VL-7B-Instruct's public config written out here, built on the meta device,
materialised on the target device in bf16 with random weights (normal 0.02, norms 1, biases 0),
saved as a checkpoint folder (no download). Its processor carries Qwen's published 12.8 MP pixel cap,
so the check also shows that every entry point applies the default cap of 1,003,520 pixels. The
tokenizer is mgiqa.tiny_vlm's (ids < 152,064 suffice), so the prompt's text is shorter than with
Qwen's own; image tokens are the same for the same image size. Data: a manifest of 7 images of
512x384 (KADID-10k's size) and one of 4000x3000 (a SPAQ original), all in every batch of B = 8.
Settings as the README's recipe: LoRA rank 64, K = 6, 256 new tokens (forced: the random model
never stops), gradient checkpointing, bf16 compute. Random weights write no parsable answer, so
rewards are 0: the figures are time and memory, not learning.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate  # noqa: E402
import grpo  # noqa: E402
import mgiqa  # noqa: E402
import parallel  # noqa: E402

QWEN25_VL_7B_TEXT = dict(  # Qwen/Qwen2.5-VL-7B-Instruct config.json
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, hidden_act="silu",
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TINY_TEXT = {**QWEN25_VL_7B_TEXT, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2,
             "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}}
TINY_VISION = {**QWEN25_VL_7B_VISION, "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": 64, "fullatt_block_indexes": [1, 3]}
QWEN_MAX_PIXELS = 12845056  # Qwen's published preprocessor_config.json


def build(tiny: bool, device: torch.device, out: str, layers: int | None = None) -> None:
    """Save the 7B architecture (or a small one) with random weights, and a processor, to `out`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _, processor = mgiqa.tiny_vlm(0, "tiny")
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
           ("start", "<|vision_start|>"), ("end", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    special = dict(bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    text = {**(TINY_TEXT if tiny else QWEN25_VL_7B_TEXT), **special}
    if layers:
        text["num_hidden_layers"] = layers
    config = Qwen2_5_VLConfig(text_config=text,
                              vision_config=TINY_VISION if tiny else QWEN25_VL_7B_VISION,
                              image_token_id=ids["image"], video_token_id=ids["video"],
                              vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
                              tie_word_embeddings=False, **special)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["pad"], ids["eos"], ids["pad"]
    model.save_pretrained(out)  # rope buffers are not saved: from_pretrained rebuilds them
    processor.image_processor.size["longest_edge"] = QWEN_MAX_PIXELS
    processor.save_pretrained(out)


def make_data(root: str, big: tuple[int, int], n_small: int = 7) -> list[str]:
    """A manifest dataset: n_small noise images of 512x384 and one of `big` size, all training images
    (plus two held-out 512x384 ones for evaluate.py). Returns the image paths."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    rows, paths = [], []
    sizes = [(512, 384)] * n_small + [big] + [(512, 384)] * 2
    for i, (w, h) in enumerate(sizes):
        path = os.path.join(root, f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append([os.path.basename(path), f"{rng.uniform(1, 5):.2f}", "train" if i <= n_small else "test"])
        paths.append(path)
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["image", "mos", "split"], *rows])
    return paths


def emit(line: dict) -> None:
    if parallel.rank() == 0:
        print(json.dumps(line), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GRPO steps, evaluation and scoring of a random Qwen2.5-VL-7B through the entry points.")
    ap.add_argument("--tiny", action="store_true", help="a small config on the CPU (what the test suite runs)")
    ap.add_argument("--fsdp", action="store_true", help="--full --fsdp instead of LoRA (run under torchrun)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps (the first includes warm-up costs)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 28, the 7B's; --fsdp on ONE 141 GB GPU needs fewer: full fine-tuning "
                         "holds 16 bytes a parameter unsharded, 133 GB for all 28)")
    ap.add_argument("--work", default=None, help="folder for the model, data and runs (default: a temporary one)")
    args = ap.parse_args(argv)

    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    cuda = device.type == "cuda"
    B, K, T = (2, 2, 8) if tiny else (8, 6, 256)
    t0 = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("gpu_check.py: one process (torchrun --nproc_per_node 1 for --fsdp)")
    build(tiny, device, os.path.join(work, "model"), args.layers)
    make_data(os.path.join(work, "data"), (4000, 3000), n_small=B - 1)
    emit({"event": "built", "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
          "gpu": torch.cuda.get_device_name() if cuda else None, "work": work})
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = os.path.join(work, "run")
    mode = ["--full", "--fsdp", "--save-every", "0", "--beta", "0"] if args.fsdp else ["--merge", os.path.join(work, "merged"), "--save-every", str(args.steps)]
    t = time.perf_counter()
    code = grpo.main(["--model", os.path.join(work, "model"), "--data", f"manifest={os.path.join(work, 'data')}",
                      "--out", run, "--steps", str(args.steps), "-B", str(B), "-K", str(K), "--max-new-tokens", str(T),
                      "--force-length", "--gradient-checkpointing", "--dtype", "bfloat16", *mode])
    if code:
        raise SystemExit(f"gpu_check.py: grpo.main exited {code}")
    if parallel.rank() != 0:
        return 0
    steps = [json.loads(ln) for ln in open(os.path.join(run, "log.jsonl"))]
    for s in steps:
        emit({"event": "step", **{k: s.get(k) for k in ("step", "gen_s", "reward_s", "update_s", "length", "loss",
                                                        "grad_norm", "prompt_tokens", "image_tokens", "peak_mem_gib")}})
        if s["length"] != T or s["image_tokens"] > (B - 1) * 252 + 1280:  # 252 tokens per 512x384, <= 1,280 capped
            raise SystemExit(f"gpu_check.py: step {s['step']}: length {s['length']}, {s['image_tokens']} image tokens")
    timed = steps[1:] or steps
    emit({"event": "train", "seconds": round(time.perf_counter() - t, 1), "steps": len(steps),
          "sec_per_step": round(float(np.mean([s["gen_s"] + s["reward_s"] + s["update_s"] for s in timed])), 2),
          **{k: round(float(np.mean([s[k] for s in timed])), 2) for k in ("gen_s", "update_s")},
          "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
          "mode": "full fsdp" if args.fsdp else "lora", "B": B, "K": K, "new_tokens": T})
    checkpoint = os.path.join(run, "final") if args.fsdp else os.path.join(work, "merged")
    t = time.perf_counter()
    code = evaluate.main(["--model", checkpoint, "--data", f"manifest={os.path.join(work, 'data')}", "--split", "test",
                          "--out", os.path.join(work, "eval"), "--max-new-tokens", str(T), "--batch-size", "2"])
    emit({"event": "evaluate", "exit": code, "seconds": round(time.perf_counter() - t, 1)})
    if code:
        raise SystemExit(f"gpu_check.py: evaluate.main exited {code}")
    t = time.perf_counter()
    code = mgiqa.main(["--model", checkpoint, os.path.join(work, "data", f"img{B - 1}.jpg"), "--json", "--max-new-tokens", "16"])
    emit({"event": "score", "exit": code, "seconds": round(time.perf_counter() - t, 1)})
    if code:
        raise SystemExit(f"gpu_check.py: mgiqa.main exited {code}")
    emit({"event": "done", "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
