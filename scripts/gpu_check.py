"""Issue 6's GPU check: 2 LoRA GRPO steps of grpo.py on the real Qwen2.5-VL-7B architecture with
random weights (no download), B=8 images, K=6, 256 new tokens (forced), bf16, gradient checkpointing;
prints peak GPU memory and seconds per step as JSON lines.

    python scripts/gpu_check.py                    # on a GPU (about 16 GB of weights; fits one 80 GB card)
    python scripts/gpu_check.py --tiny --steps 1   # the same code path on CPU, a small config

The model: Qwen2.5-VL-7B-Instruct's public config written out by hand, built on the meta device,
materialised with to_empty on the target device in bf16, then given random weights (normal 0.02,
norms 1, biases 0) and its rope buffers recomputed. The tokenizer and processor are mgiqa.tiny_vlm's
(ids < 152064 suffice; sampled ids beyond its vocabulary decode to nothing), so prompts are shorter
than with Qwen's own tokenizer apart from the image tokens, which are the same for the same image
size (512x384 as KADID-10k -> 252 image tokens). LoRA as grpo's defaults (rank 64, alpha 128, the
language model's attention and MLP projections) through grpo.add_lora; the step is grpo.grpo_step.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpo  # noqa: E402
import mgiqa  # noqa: E402

QWEN25_VL_7B_TEXT = dict(  # Qwen/Qwen2.5-VL-7B-Instruct config.json
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_dropout=0.0,
    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, hidden_act="silu",
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
TINY_TEXT = {**QWEN25_VL_7B_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2,
             "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}}
TINY_VISION = {**QWEN25_VL_7B_VISION, "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": 64, "fullatt_block_indexes": [1, 3]}


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """(model, processor): the 7B architecture (or a small one) with random weights, on device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _, processor = mgiqa.tiny_vlm(0, "tiny")
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
           ("start", "<|vision_start|>"), ("end", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    special = dict(bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    config = Qwen2_5_VLConfig(text_config={**(TINY_TEXT if tiny else QWEN25_VL_7B_TEXT), **special},
                              vision_config=TINY_VISION if tiny else QWEN25_VL_7B_VISION,
                              image_token_id=ids["image"], video_token_id=ids["video"],
                              vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
                              tie_word_embeddings=False, **special)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    for name, module in list(model.named_modules()):  # to_empty left the non-persistent rope buffers empty
        if any(True for _ in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise RuntimeError(f"gpu_check.py: cannot rebuild the buffers of {name} ({type(module).__name__})")
            with torch.device(device):
                fresh = type(module)(module.config)
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, fresh)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["pad"], ids["eos"], ids["pad"]
    return model.eval(), processor, config


def check_buffers(model, config) -> None:
    """--tiny: the rebuilt buffers equal those of a model built the ordinary way."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    ref = dict(Qwen2_5_VLForConditionalGeneration(config).named_buffers())
    got = dict(model.named_buffers())
    assert got.keys() == ref.keys(), (got.keys(), ref.keys())
    for n in ref:
        assert torch.equal(got[n].cpu(), ref[n]), n


def main(argv=None):
    ap = argparse.ArgumentParser(description="2 LoRA GRPO steps on random Qwen2.5-VL-7B weights: peak memory, s/step.")
    ap.add_argument("--tiny", action="store_true", help="a small config on CPU (tests this script)")
    ap.add_argument("--batch-size", "-B", type=int, default=8)
    ap.add_argument("--num-generations", "-K", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--image-size", type=int, nargs=2, default=[512, 384], metavar=("W", "H"))
    ap.add_argument("--steps", type=int, default=2, help="timed steps, after --warmup untimed ones")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=0, help="images per micro-batch (0: all B)")
    ap.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    model, processor, config = build(args.tiny, device, dtype)
    if args.tiny:
        check_buffers(model, config)
    grpo.add_lora(model)  # grpo's defaults: rank 64, alpha 128, LM attention and MLP projections
    if hasattr(grpo, "fast_vision"):
        grpo.fast_vision(model)  # as grpo.build_model does
    if args.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = True
    cfg = {**grpo.DEFAULTS, "batch_size": args.batch_size, "num_generations": args.num_generations,
           "max_new_tokens": args.new_tokens, "force_length": True, "gradient_checkpointing": args.gc,
           "micro_batch": args.micro_batch, "dtype": str(dtype).replace("torch.", "")}
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from PIL import Image
    from reward import preference_matrix
    rng = np.random.default_rng(0)
    W, H = args.image_size
    images = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    labels = torch.tensor(rng.uniform(1, 5, (len(mgiqa.ATTRIBUTES), args.batch_size)))
    P, M = (torch.stack(t).to(device) for t in zip(*(preference_matrix(y) for y in labels)))
    p = grpo.encode_prompts(model, processor, images[:1])
    print(json.dumps({"event": "built", "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "dtype": cfg["dtype"],
                      "params": n_params, "trainable": n_train, "prompt_tokens": p.input_ids.shape[1],
                      "image_tokens": int(p.image_grid_thw.prod() // 4), "B": args.batch_size,
                      "K": args.num_generations, "new_tokens": args.new_tokens, "gradient_checkpointing": args.gc}), flush=True)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg["lr"])
    policy = grpo.PolicyLogprobs(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        stats = grpo.grpo_step(cfg, model, processor, policy, {"P": P, "M": M}, images, optimizer=optimizer)
        sync()
        sec = time.perf_counter() - t
        line = {"event": "step", "step": step + 1, "warmup": step < args.warmup, "seconds": round(sec, 2),
                **{k: round(stats[k], 2) for k in ("gen_s", "reward_s", "update_s", "length", "loss", "grad_norm")}}
        if device.type == "cuda":
            line.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
        print(json.dumps(line), flush=True)
        if not np.isfinite(stats["loss"]) or stats["length"] != args.new_tokens:
            raise RuntimeError(f"gpu_check.py: step {step + 1} gave loss {stats['loss']}, length {stats['length']}")
        if step >= args.warmup:
            timed.append(line)
    summary = {"event": "summary", "sec_per_step": round(float(np.mean([s["seconds"] for s in timed])), 2),
               **{k: round(float(np.mean([s[k] for s in timed])), 2) for k in ("gen_s", "reward_s", "update_s")}}
    if device.type == "cuda":
        summary.update(peak_allocated_gib=max(s["peak_allocated_gib"] for s in timed),
                       peak_reserved_gib=max(s["peak_reserved_gib"] for s in timed))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
