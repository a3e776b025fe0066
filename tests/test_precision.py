"""The GPU path's numerics, shown on the CPU: trainable state in fp32 under bf16 compute, through
grpo.main itself; merges in fp32; the default pixel cap; one decoding contract; one place where a
batch meets the model's device. (A CPU cannot show a device mismatch: test_batch_meets_the_device
moves a batch to the meta device instead, and scripts/gpu_check.py runs the same path on a GPU.)"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import grpo
import lora
import mgiqa
import rollouts
import step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answer(rng) -> str:
    return "<answer>{" + ", ".join(f'"{a}": {rng.randint(1, 5)}' for a in mgiqa.ATTRIBUTES) + "}</answer>"


@pytest.fixture(scope="module")
def formatted(tmp_path_factory):
    """A tiny model that answers in the fast layout with random scores (200 supervised steps on
    random-digit answers, about 20 s): its rollouts parse, so the real reward has a gradient."""
    torch.manual_seed(0)
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(8)]
    p = rollouts.encode_prompts(model, processor, images, thinking=False)
    tok, digits = processor.tokenizer, random.Random(0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        ids = torch.tensor([tok(answer(digits))["input_ids"] + [eos] for _ in images])  # (8, T): one token per digit
        hidden = rollouts.completion_hidden(model, p, 1, ids, torch.ones_like(ids))
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("formatted")
    model.eval().save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    data.make_synthetic(str(out / "data"), 30, 56, seed=0)
    return out


def train(formatted, out, *flags):
    """3 steps of grpo.main, a checkpoint after each; returns the weights after step 1 and step 3, and the log."""
    code = grpo.main(["--model", str(formatted / "model"), "--data", f"manifest={formatted / 'data'}", "--fast",
                      "--out", str(out), "--steps", "3", "--save-every", "1", "--keep", "3", "-B", "4", "-K", "4",
                      "--max-new-tokens", "20", "--lora-rank", "8", "--lora-alpha", "16", "--threads", "2", *flags])
    assert code == 0
    name = "trainable.safetensors" if "--full" in flags else "adapter/adapter_model.safetensors"
    first, last = (load_file(str(out / f"checkpoint-{i}" / name)) for i in (1, 3))
    return first, last, [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


def changed_fraction(a, b, keep=lambda n: True) -> float:
    names = [n for n in a if keep(n)]
    assert names
    return sum(int((a[n] != b[n]).sum()) for n in names) / sum(a[n].numel() for n in names)


def test_bf16_lora_run_trains_fp32_adapters_and_matches_fp32_first_loss(formatted, tmp_path):
    first, last, log = train(formatted, tmp_path / "bf16", "--dtype", "bfloat16", "--lr", "1e-5")
    assert all(t.dtype == torch.float32 for t in last.values())  # A and B are fp32 whatever the base
    assert log[0]["format"] > 0.2 and any(abs(s["loss"]) > 0 or s["grad_norm"] > 0 for s in log)
    # B moved from step 1 on; A (whose gradient is 0 while B = 0) from step 2 on: so steps 1 -> 3
    assert changed_fraction(first, last, lambda n: "lora_A" in n) > 0.99
    assert changed_fraction(first, last, lambda n: "lora_B" in n) > 0.99
    _, _, log32 = train(formatted, tmp_path / "fp32", "--dtype", "float32", "--lr", "1e-5")
    # with one iteration rho = 1, so the first loss is -mean advantage + beta * 0: ~0 in both, up to
    # the rounding of different rollouts (bf16 sampling differs from fp32)
    assert log[0]["loss"] == pytest.approx(log32[0]["loss"], abs=1e-4)


def test_bf16_full_run_keeps_fp32_master_weights(formatted, tmp_path):
    first, last, _ = train(formatted, tmp_path / "full", "--full", "--dtype", "bfloat16", "--lr", "1e-6")
    assert all(t.dtype == torch.float32 for t in last.values())
    assert changed_fraction(first, last) > 0.99  # a bf16 weight would have kept ~98% of them (update < half an ulp)
    model, _ = mgiqa.load(str(tmp_path / "full" / "final"), device="cpu", dtype="float32")  # final/: the trained model
    params = dict(model.named_parameters())
    assert params.keys() == last.keys() and all(torch.equal(params[n], last[n]) for n in last)


def test_bf16_compute_logprobs_match_fp32(formatted):
    """The same completions scored by the bf16-base LoRA model and by the fp32 one: within bf16 rounding."""
    lps = []
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = mgiqa.load(str(formatted / "model"), device="cpu", dtype=str(dtype).removeprefix("torch."))
        lora.add_lora(model, rank=4, alpha=8)
        images = [Image.fromarray(np.full((56, 56, 3), 120, dtype=np.uint8))] * 2
        p = rollouts.encode_prompts(model, processor, images, thinking=False)
        ids = torch.tensor([processor.tokenizer(answer(random.Random(i)))["input_ids"] for i in range(4)])
        with torch.no_grad():
            lps.append(rollouts.completion_logprobs(model, p, 2, ids, torch.ones_like(ids), 1.0, mgiqa.banned_token_ids(processor)))
    assert lps[1].dtype == torch.float32
    assert (lps[0] - lps[1]).abs().mean() < 0.05 and (lps[0] - lps[1]).abs().max() < 0.3


def test_merge_adds_in_fp32_and_casts_once():
    w = torch.full((4, 4), 0.02, dtype=torch.bfloat16)
    a, b = torch.full((1, 4), 1e-2), torch.full((4, 1), 1e-2)  # delta 2 * 4e-4 ... below half a bf16 ulp at 0.02? no: 8e-5
    delta = 2.0 * (b @ a)
    want = (w.float() + delta).to(torch.bfloat16)
    assert torch.equal(lora.merged_weight(w, a, b, 2.0), want)
    many = w.clone()
    for _ in range(8):  # eight small deltas added in bf16 one by one are lost; summed in fp32 they are not
        many += (delta / 8).to(torch.bfloat16)
    assert torch.equal(many, w) and not torch.equal(want, w)


def test_default_pixel_cap_holds_a_4000x3000_photo(tmp_path):
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    processor.image_processor.size["longest_edge"] = 12845056  # Qwen's published 12.8 MP
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    photo = Image.new("RGB", (4000, 3000), (90, 120, 150))
    uncapped = processor.image_processor(images=[photo], return_tensors="pt")["image_grid_thw"].prod() // 4
    assert uncapped == 15301  # what Qwen's own cap gives
    _, loaded = mgiqa.load(str(tmp_path / "m"), device="cpu")
    enc = rollouts.encode_prompts(model, loaded, [photo])
    assert enc.image_grid_thw.prod() // 4 <= mgiqa.DEFAULT_MAX_PIXELS // (28 * 28)
    assert mgiqa.DEFAULT_MAX_PIXELS == 1280 * 28 * 28
    _, small = mgiqa.load("tiny", device="cpu")  # a smaller saved cap (448 x 448) wins
    assert small.image_processor.size["longest_edge"] == 448 * 448


def test_checkpoint_generation_config_cannot_change_scores(tmp_path):
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    model.save_pretrained(tmp_path / "plain")
    gc = model.generation_config  # in the manner of Qwen's published file, with stronger values
    gc.do_sample, gc.temperature, gc.top_k, gc.repetition_penalty, gc.no_repeat_ngram_size = True, 0.1, 3, 1.5, 2
    model.save_pretrained(tmp_path / "penalised")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (56, 84, 3), dtype=np.uint8)) for i in range(3)]
    scored = {}
    for name in ("plain", "penalised"):
        processor.save_pretrained(tmp_path / name)
        m, proc = mgiqa.load(str(tmp_path / name), device="cpu")
        assert (m.generation_config.repetition_penalty == 1.5) == (name == "penalised")
        greedy = mgiqa.score(m, proc, images, max_new_tokens=24)
        torch.manual_seed(0)
        sampled = mgiqa.score(m, proc, images, max_new_tokens=24, temperature=1.0, num_samples=2)
        scored[name] = [r["completions"] for r in greedy + sampled]
    assert scored["plain"] == scored["penalised"]


def test_batch_meets_the_device():
    P, M = torch.zeros(5, 2, 2), torch.zeros(5, 2, 2, dtype=torch.bool)
    batch = step.to_device({"P": P, "M": M, "labels": torch.zeros(2, 5), "records": ["a", "b"], "dataset": "d"}, "meta")
    assert all(batch[k].device.type == "meta" for k in ("P", "M", "labels")) and batch["records"] == ["a", "b"]
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    p = rollouts.encode_prompts(model, processor, [Image.new("RGB", (56, 56))])
    moved = step.to_device(p, "meta")
    assert all(getattr(moved, f).device.type == "meta" for f in ("input_ids", "attention_mask", "positions", "pixel_values"))
    assert moved.shared == p.shared


def test_gpu_check_tiny_runs_through_the_three_entry_points(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--tiny", "--steps", "1",
                           "--work", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"event"')]
    assert [e["event"] for e in events] == ["built", "step", "train", "evaluate", "score", "done"]
    assert events[1]["image_tokens"] <= 252 + 1280 and events[1]["length"] == 8  # 512x384 and a capped 4000x3000
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "eval" / "summary.json").is_file()
