"""scripts/fit.py: the live-bytes count against hand-computed sizes, skipped matmuls against
computed ones (same bytes), the linear extrapolation's arithmetic, and reduced-depth extrapolation
against a full-depth measurement on the tiny models (both families, LoRA, gradient checkpointing);
gpu_check.py's comparison with a prediction."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import architectures  # noqa: E402
import fit  # noqa: E402

STEP = ["-B", "1", "-K", "2", "--max-new-tokens", "4", "--gradient-checkpointing",
        "--lora-rank", "8"]


def test_live_bytes_counts_a_known_computation():
    """4,000 + 200 bytes made, a view adds none, a freed storage leaves, the peak stays; under
    autograd exp's output is kept for backward (400 bytes) until backward frees it."""
    w = torch.ones(100)  # 400 bytes, made before: counted through add()
    tracker = fit.LiveBytes()
    tracker.add(w, "weights")
    with tracker:
        a = torch.zeros(1000)                          # 4,000 bytes
        b = torch.ones(10, 10, dtype=torch.bfloat16)   # 200 bytes
        view = a[:10]                                   # no new storage
        assert tracker.total == 400 + 4000 + 200 and tracker.by_kind["weights"] == 400
        del a
        assert tracker.total == 4600                    # the view keeps a's storage alive
        del view
        assert tracker.total == 600
        first = tracker.close()
        assert (first["peak"], first["weights"], first["activations"]) == (4600, 400, 4200)
        x = torch.ones(100, requires_grad=True)         # 400
        y = x.exp()                                     # 400, saved for backward
        loss = y.sum()                                  # 4 (a scalar)
        del y
        assert tracker.total == 600 + 400 + 400 + 4
        loss.backward()                                 # x.grad: 400; exp's saved output freed
        del b
    assert tracker.total == 400 + 400 + 4 + 400
    # the peak: backward's seed (a 4-byte one) and x.grad made while exp's output is still kept
    assert tracker.close()["peak"] == 600 + 400 + 400 + 4 + 4 + 400


def test_linear_and_extrapolate_recover_a_known_bilinear_law():
    """Points made from m = 7 + 3 L + 5 V + B (2 + L) give back its value at L 28, V 32, B 8; a
    segment that peaks higher at the measured depths (100 + L) but grows slower is not the peak."""
    law = lambda L, V, B: 7 + 3 * L + 5 * V + B * (2 + L)  # noqa: E731
    def figures(L, V, B):
        segments = {"steep": {"peak": law(L, V, B)}, "flat": {"peak": 100 + L}}
        return {"segments": segments, "flops": 2 * law(L, V, B), "cpu_s": 1.0}
    points = {(L, V, B): {ph: figures(L, V, B) for ph in fit.PHASES}
              for L, V in ((1, 2), (2, 2), (1, 3)) for B in (3, 4)}
    got = fit.extrapolate(points, (1, 2), (2, 3), (3, 4), (28, 32, 8))["update"]
    assert got["peak"] == pytest.approx(law(28, 32, 8)) == 7 + 84 + 160 + 240
    assert got["segments"]["flat"]["peak"] == pytest.approx(128)
    assert got["flops"] == pytest.approx(982)
    assert fit.linear(1, 10, 3, 20, 7) == 40 and fit.linear(2, 5, 2, 5, 9) == 5


def test_batch_points_must_share_the_lm_head_chunking():
    cfg = fit.config_from(fit.build_parser().parse_args(["--model", "qwen2.5-vl-7b", "-B", "8"]))
    fit.check_batch_points(cfg, (3, 4))     # 4,608 and 6,144 positions: chunked as 12,288 are
    with pytest.raises(SystemExit, match="--batch-points 2"):
        fit.check_batch_points(cfg, (2, 4))             # 3,072: one unchunked block


def tiny_setup(name):
    args = fit.build_parser().parse_args(["--model", name, *STEP])
    cfg = fit.config_from(args)
    config = fit.base_config(name)
    return cfg, config, fit.processor_for(name, config)


def test_skipped_matmuls_leave_the_bytes_unchanged(one_thread):
    """Products, and elementwise ops on tensors of 2**20 elements or more (the training forward's
    logits here; not decoding's), allocated and not computed: the same bytes, the same FLOPs."""
    cfg, config, processor = tiny_setup("tiny-qwen2.5-vl")
    skipped = fit.measure(cfg, config, processor, 1, 2, 1, "56x56", exact=False, big=2 ** 20)
    exact = fit.measure(cfg, config, processor, 1, 2, 1, "56x56", exact=True)
    for ph in fit.PHASES:
        assert skipped[ph]["peak"] == exact[ph]["peak"], ph
        assert skipped[ph]["flops"] == exact[ph]["flops"], ph
    assert skipped["update"]["kv_cache"] == 0 and skipped["sampling"]["kv_cache"] > 0
    assert {"aten.mm.default", "aten.logsumexp.default"} <= set(skipped["allocated_only"])
    assert not exact["allocated_only"]


@pytest.mark.parametrize("name", architectures.TINY)
def test_reduced_depth_extrapolates_to_the_full_depth_measurement(name, one_thread):
    """The tiny width at 5 layers and 5 vision blocks, measured with the products computed, against
    the extrapolation from (1, V1), (2, V1), (1, V1 + 1) measured without: the peaks within 5%, the
    weights exact, and the update's growth from (1, V1) to full depth within 5%."""
    cfg, config, processor = tiny_setup(name)
    target = architectures.with_depth(config, 5, 5)
    v1 = architectures.min_vision_depth(config)
    points = {(L, V, 1): fit.measure(cfg, config, processor, L, V, 1, "56x56")
              for L, V in ((1, v1), (2, v1), (1, v1 + 1))}
    predicted = fit.extrapolate(points, (1, 2), (v1, v1 + 1), (1,), (5, 5, 1))
    measured = fit.measure(cfg, target, processor, 5, 5, 1, "56x56", exact=True)
    for ph in fit.PHASES:
        assert predicted[ph]["peak"] == pytest.approx(measured[ph]["peak"], rel=0.05), ph
        assert predicted[ph]["weights"] == pytest.approx(measured[ph]["weights"], rel=1e-9), ph
    grown = measured["update"]["peak"] - points[(1, v1, 1)]["update"]["peak"]
    predicted_growth = predicted["update"]["peak"] - points[(1, v1, 1)]["update"]["peak"]
    assert grown > 0 and predicted_growth == pytest.approx(grown, rel=0.05)


def test_gpu_check_compares_only_the_same_configuration():
    """gpu_check.py --predicted: a prediction for another -B is refused by name; per phase the
    measured GiB beside the predicted and their ratio (hand values)."""
    import argparse
    import json

    import gpu_check

    pred = {"model": "qwen2.5-vl-7b", "images": "gpu_check",
            "config": {"batch_size": 8, "num_generations": 6, "max_new_tokens": 256,
                       "max_pixels": 0, "micro_batch": 0, "full": False, "lora_rank": 64,
                       "gradient_checkpointing": True, "dtype": "bfloat16"},
            "predicted": {"sampling": {"peak": 20 * 2**30}, "update": {"peak": 40 * 2**30}}}
    args = argparse.Namespace(config="qwen2.5-vl-7b", model=None, batch_size=8, num_generations=6,
                              max_new_tokens=256, max_pixels=0, micro_batch=0)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fit-pred-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(pred, f)
    assert gpu_check.load_prediction(path, args)["model"] == "qwen2.5-vl-7b"
    with pytest.raises(SystemExit, match="-B 4 .the prediction's 8"):
        gpu_check.load_prediction(path, argparse.Namespace(**{**vars(args), "batch_size": 4}))
    os.remove(path)
    measured = {"sampling": {"s": 1.0, "peak_gib": 21.0}, "update": {"s": 2.0}}
    rows = gpu_check.predicted_vs_measured(pred, measured)
    assert rows["sampling"] == {"predicted_gib": 20.0, "measured_gib": 21.0,
                                "measured_over_predicted": 1.05}
    assert rows["update"]["measured_gib"] is None  # no CUDA, no measurement
