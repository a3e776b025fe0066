"""Will it fit my GPU? The peak bytes of live tensors of one GRPO step (grpo.grpo_step, the real
one), per phase, measured on the CPU at the model's real width and reduced depth, extrapolated
linearly to the full depth (and batch), against --gpu-memory.

    python scripts/fit.py --model qwen3-vl-4b -B 4 -K 6 --max-pixels 262144 --micro-batch 2 \
        --gradient-checkpointing --gpu-memory 24                   # the README's 24 GB recipe
    python scripts/fit.py --model qwen2.5-vl-7b -B 8 -K 6 --gradient-checkpointing \
        --batch-points 3 4 --gpu-memory 80 --json-out docs/fit/qwen2.5-vl-7b-b8.json
    python scripts/fit.py --model /ckpt/Qwen2.5-VL-7B-Instruct ...  # a folder with a config.json

What is measured: the bytes of every tensor storage alive at each moment of the step (LiveBytes,
a TorchDispatchMode), what torch.cuda.max_memory_allocated counts on a GPU for the same shapes
and dtypes, before the caching allocator's rounding and the kernels' own workspaces. The model
is the architecture's config (architectures.py, or --model's config.json) with random weights in
the dtype the GPU run uses (bf16 base and fp32 adapters under LoRA; fp32 master weights under
--full), the family's real processor (tests/fixtures) and images of the sizes gpu_check.py
trains on (B-1 of 512x384 and one 4000x3000; --images WxH for one size). Every completion is
--max-new-tokens long (force_length), so no shape depends on when a random model writes EOS.
The optimizer state and the previous step's gradients exist from the start, as in every step
after the first.

Matrix products and attention kernels, and elementwise ops on tensors of BIG elements or more,
allocate their outputs (true shape, dtype and strides) without computing them, and the weights
are not written (--exact computes and writes everything): the bytes are the same (a test checks
it on the tiny models), and a real-width step takes a minute or two on 2 cores, not hours.
Values are garbage; no shape depends on them.

Extrapolation: a phase's peak, split by what is alive at that moment (weights, gradients,
optimizer state, KV cache, activations: everything else, inputs included), is measured at three
depths, (L1, V1), (L2, V1), (L1, V2) language layers / vision blocks, and taken as linear in
each (slopes from the two differences). With --batch-points b1 b2 the same at two batch sizes,
then linear in B between them (images: b-1 small and one big). The output says what was measured
and what extrapolated. FLOPs (each op's formula from torch.utils.flop_counter, the table that
FlopCounterMode counts with) extrapolate the same way; seconds = FLOPs / (--mfu x --peak-tflops)
is an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
import weakref

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import architectures  # noqa: E402
import distributed  # noqa: E402
import grpo  # noqa: E402
import mgiqa  # noqa: E402
import rollouts  # noqa: E402
import tiny  # noqa: E402
from mgiqa import ATTRIBUTES  # noqa: E402
from reward import preference_matrix  # noqa: E402

GIB = 2 ** 30
PHASES = ("sampling", "reward", "reference", "update")
KINDS = ("weights", "gradients", "optimizer", "kv_cache", "activations")
SMALL_IMAGE, BIG_IMAGE = (512, 384), (4000, 3000)  # gpu_check.make_data's: KADID-10k, a SPAQ photo
LOGIT_CHUNK = 4096  # rollouts.token_logprobs' chunk: above it the LM head is recomputed in backward

aten = torch.ops.aten
# what returns zeros of its true shape instead of computing (the matmuls and attention kernels)
SKIPPED = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
           aten.convolution.default, aten.convolution_backward.default}
# Elementwise ops, reductions and copies that are also only allocated when one of their floating
# tensors has BIG elements or more: the training forward's logits, MLP and norms (values garbage);
# below it (decoding: rows x vocabulary) they compute, so sampling sees finite numbers more often
ELEMENTWISE = {aten._to_copy, aten.add, aten.sub, aten.mul, aten.div, aten.exp, aten.neg, aten.pow,
               aten.rsqrt, aten.mean, aten.sum, aten.silu, aten.silu_backward, aten.where,
               aten.masked_fill, aten.gather, aten.scatter_add, aten.logsumexp, aten.cat,
               aten.embedding, aten._softmax, aten._log_softmax}
BIG = 2 ** 24
# FLOPs per op: torch.utils.flop_counter's formulas (what FlopCounterMode counts with), counted in
# LiveBytes' own dispatch (one Python mode, not two: half the overhead); its flash-attention
# formulas for the CPU's flash kernels, which its table lacks
FLOPS = dict(flop_counter.flop_registry)
FLOPS[aten._scaled_dot_product_flash_attention_for_cpu] = FLOPS[
    aten._scaled_dot_product_flash_attention]
FLOPS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = FLOPS[
    aten._scaled_dot_product_flash_attention_backward]


# ----------------------------------------------------------------------------- counting live bytes

class LiveBytes(TorchDispatchMode):
    """The bytes of live tensor storages: every storage an op creates is counted until it is freed
    (a weakref finalizer on the storage), storages present before (weights, inputs) through add().
    Each storage has a kind (KINDS); `peak` and `at_peak` (bytes per kind at that moment) are since
    the last close(). skip_compute: SKIPPED ops return zeros of their true shape (same bytes)."""

    def __init__(self, skip_compute: bool = False, big: int = BIG):
        super().__init__()
        self.skip_compute, self.big = skip_compute, big
        self.live = {}  # storage data_ptr -> [bytes, kind]
        self.allocated_only = collections.Counter()  # ops not computed, by name
        self.by_kind = collections.Counter()
        self.total = self.peak = self.flops = 0
        self.at_peak: dict = {}
        self.segments: dict = {}  # the current phase's closed segments

    def add(self, tensor, kind: str = "activations") -> None:
        """Count tensor's storage (once) as `kind`; a storage already counted changes to `kind`."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        if key in self.live:
            old_size, old_kind = self.live[key]
            self._change(old_kind, -old_size)
        else:
            weakref.finalize(storage, self._free, key)
        self.live[key] = [size, kind]
        self._change(kind, size)

    def _free(self, key) -> None:
        if key in self.live:
            size, kind = self.live.pop(key)
            self._change(kind, -size)

    def _change(self, kind: str, delta: int) -> None:
        self.by_kind[kind] += delta
        self.total += delta
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.by_kind)

    def cut(self, name: str) -> None:
        """End a segment of the phase here (its peak, and the bytes per kind at it, under name): a
        peak at another moment may grow faster with depth (decoding's KV cache against the
        prefill), so each segment is extrapolated on its own."""
        self.segments[name] = {"peak": self.peak, **{k: self.at_peak.get(k, 0) for k in KINDS}}
        self.peak, self.at_peak = self.total, dict(self.by_kind)

    def close(self, name: str = "rest") -> dict:
        """The peak since the last close, with the bytes per kind at it, and each segment's (the
        last one named `name`); the next phase starts now."""
        self.cut(name)
        segments, self.segments = self.segments, {}
        top = max(segments.values(), key=lambda f: f["peak"])
        return {**top, "segments": segments}

    def skipped(self, func, args, kwargs) -> bool:
        """SKIPPED ops, and ELEMENTWISE ones on a big floating tensor (new outputs only)."""
        if not self.skip_compute:
            return False
        if func in SKIPPED:
            self.allocated_only[func] += 1
            return True
        if func._overloadpacket not in ELEMENTWISE or func._schema.is_mutable or "out" in kwargs:
            return False
        big = any(t.is_floating_point() and t.numel() >= self.big for t in tensors_in(args))
        self.allocated_only[func] += big
        return big

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        skip = self.skipped(func, args, kwargs)
        out = empty_result(func, args, kwargs) if skip else func(*args, **kwargs)
        count = FLOPS.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        for t in tensors_in(out if isinstance(out, (tuple, list)) else (out,)):
            storage = t.untyped_storage()
            known = self.live.get(storage.data_ptr())
            if known is None or known[0] != storage.nbytes():  # new, or resized by an out= op
                self.add(t, known[1] if known else "activations")
        return out


def tensors_in(values) -> list:
    """The tensors among an op's arguments or outputs (aten nests at most one list deep);
    tree_flatten's generality cost a third of a decoding step's time."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return out


def empty_result(func, args, kwargs):
    """func's outputs, allocated with their true shape, dtype and strides (from its meta kernel) and
    not written: values are garbage, bytes are right. The LM head is such a product, so sampled
    tokens come from garbage logits: rollouts.sample_tokens still returns an id in the vocabulary.
    An op whose meta kernel needs values (a 0-dim operand it reads) is computed instead."""
    def meta(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:  # a 0-dim CPU scalar mixes with meta
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    def real(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    try:
        shapes = func(*tree_map(meta, args), **tree_map(meta, kwargs))
    except (NotImplementedError, RuntimeError):
        return func(*args, **kwargs)
    return tree_map(real, shapes)


@contextlib.contextmanager
def kv_cache_counted(tracker: LiveBytes):
    """The KV caches' tensors counted as kv_cache: relabelled after every cache layer update."""
    from transformers import cache_utils

    originals = {cls: cls.update for cls in (cache_utils.DynamicLayer, cache_utils.StaticLayer)}

    def wrap(update):
        def counted(self, *a, **kw):
            if isinstance(self, cache_utils.StaticLayer) and "prefill" not in tracker.segments:
                tracker.cut("prefill")  # decoding's cache is about to be allocated
            out = update(self, *a, **kw)
            for t in (getattr(self, "keys", None), getattr(self, "values", None)):
                tracker.add(t, "kv_cache")
            return out
        return counted
    for cls, update in originals.items():
        cls.update = wrap(update)
    try:
        yield
    finally:
        for cls, update in originals.items():
            cls.update = update


# ----------------------------------------------------------------------------- the model

@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init), while
    buffers (the rotary frequencies) are computed for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def random_model(config, dtype: torch.dtype, seed: int = 0, written: bool = True):
    """config's model with random weights in dtype on the CPU (normal 0.02 for matrices, norms 1,
    biases 0, as gpu_check.build; written=False leaves matrices unwritten, for steps whose products
    are not computed); tied weights stay one tensor."""
    from transformers import AutoModelForImageTextToText

    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config)
    g, made = torch.Generator().manual_seed(seed), {}
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                new = torch.empty(p.shape, dtype=dtype)
                with torch.no_grad():
                    if p.dim() >= 2:
                        if written:
                            new.normal_(0.0, 0.02, generator=g)
                    else:
                        new.fill_(0.0 if name == "bias" else 1.0)
                made[id(p)] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
    model.generation_config.bos_token_id = architectures.SPECIAL["bos_token_id"]
    model.generation_config.eos_token_id = architectures.SPECIAL["eos_token_id"]
    model.generation_config.pad_token_id = architectures.SPECIAL["pad_token_id"]
    return model.eval()


def processor_for(model_arg: str, config):
    """The checkpoint folder's processor when it has one, else the family's real one (fixtures)."""
    if os.path.isdir(model_arg):
        from transformers import AutoProcessor
        with contextlib.suppress(OSError, ValueError):
            return AutoProcessor.from_pretrained(model_arg)
    return tiny.real_processor(architectures.family(config))


def base_config(model_arg: str):
    """An architecture name (architectures.NAMES) or a folder with a config.json."""
    if model_arg in architectures.NAMES:
        return architectures.published(model_arg)
    if os.path.isfile(os.path.join(model_arg, "config.json")):
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(model_arg)
    raise SystemExit(f"fit.py: --model {model_arg!r} is neither one of "
                     f"{', '.join(architectures.NAMES)} nor a folder with a config.json")


@contextlib.contextmanager
def loading(config, processor, seed: int, written: bool = True):
    """grpo.build_model's mgiqa.load, for the duration, builds config's random model instead of
    reading a checkpoint (then processor pixel cap and padding as mgiqa.load sets them)."""
    def load(name_or_path, device="auto", dtype="auto", adapter=None, max_pixels=0, **kw):
        model = random_model(config, getattr(torch, dtype), seed, written)
        processor.tokenizer.padding_side = "left"
        ip = processor.image_processor
        mgiqa.cap_pixels(ip, mgiqa.default_max_pixels(ip) if max_pixels == 0 else max_pixels)
        return model, processor
    real = mgiqa.load
    mgiqa.load = load
    try:
        yield
    finally:
        mgiqa.load = real


# ----------------------------------------------------------------------------- one measured step

def images_for(layout: str, b: int):
    """b images: gpu_check's layout (b-1 of 512x384, one of 4000x3000) or b of one size WxH."""
    from PIL import Image

    if layout == "gpu_check":
        sizes = [SMALL_IMAGE] * (b - 1) + [BIG_IMAGE]
    else:
        sizes = [parse_size(layout)] * b
    rng = np.random.default_rng(0)
    out = []
    for w, h in sizes:  # smooth blocks, as gpu_check.make_data (no shape depends on the content)
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    return out


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
        return w, h
    except ValueError:
        raise SystemExit(f"fit.py: --images {text!r}: gpu_check or WxH (512x384)") from None


def measure(cfg: grpo.Config, config, processor, layers: int, vision: int, b: int, layout: str,
            exact: bool = False, big: int = BIG) -> dict:
    """One grpo_step of config at (layers, vision) depth on b images: per phase the peak live bytes
    (and per kind at that moment), the FLOPs and the CPU seconds."""
    cfg = dataclasses.replace(cfg, batch_size=b)
    reduced = architectures.with_depth(config, layers, vision)
    torch.manual_seed(cfg.seed)
    with loading(reduced, processor, cfg.seed, written=exact):
        model, processor, ref = grpo.build_model(cfg)
    labels = torch.tensor(np.random.default_rng(0).uniform(1, 5, (len(ATTRIBUTES), b)))
    P, M = (torch.stack(t) for t in zip(*(preference_matrix(y) for y in labels)))
    batch = {"P": P, "M": M}
    dtype = grpo.compute_dtype(cfg, "cpu")
    policy = distributed.wrap(model, False, dtype, cfg.shared_prefix)
    ref = distributed.wrap(ref, False, dtype, cfg.shared_prefix) if ref is not None else None
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # foreach=True: AdamW's default on CUDA (its temporaries span all parameters at once)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    steady_state(optimizer, trainable)
    step = optimizer.step

    def cut_then_step(*a, **kw):  # AdamW's temporaries span all trainable weights: its own moment
        tracker.cut("backward")
        return step(*a, **kw)
    tokens = resolved_tokens(cfg, model, processor)
    text = mgiqa.prompt_text(processor, cfg.thinking)
    prompts = rollouts.encode_prompts(model, processor, images_for(layout, b), text)

    tracker = LiveBytes(skip_compute=not exact, big=big)
    for m in (model, *([] if ref is None else [distributed.unwrap(ref)])):
        for t in (*m.parameters(), *m.buffers()):
            tracker.add(t, "weights")
    for p in trainable:
        tracker.add(p.grad, "gradients")
        p.register_post_accumulate_grad_hook(lambda q: tracker.add(q.grad, "gradients"))
    for state in optimizer.state.values():
        for t in state.values():
            tracker.add(t, "optimizer")
    inputs = [getattr(prompts, f.name) for f in dataclasses.fields(prompts)]
    for t in (*inputs, P, M, tokens.banned):
        tracker.add(t, "activations")  # the step's inputs
    figures, clock = {}, [time.perf_counter(), 0]

    class Counted(grpo.Phases):
        def end(self, name):
            super().end(name)
            total = tracker.flops
            figures[name] = {**tracker.close(name), "flops": total - clock[1],
                             "cpu_s": time.perf_counter() - clock[0]}
            clock[:] = [time.perf_counter(), total]

    original, grpo.Phases = grpo.Phases, Counted
    optimizer.step = cut_then_step
    try:
        tracker.close()  # the step starts from what is alive now
        with tracker, kv_cache_counted(tracker):
            stats = grpo.grpo_step(cfg, policy, processor, batch, prompts, optimizer, tokens,
                                   ref=ref)
    finally:
        grpo.Phases = original
    if stats["length"] != cfg.max_new_tokens:
        raise RuntimeError(f"fit.py: {stats['length']}-token completions, not {cfg.max_new_tokens}")
    figures.update(prompt_tokens=stats["prompt_tokens"], image_tokens=stats["image_tokens"])
    figures["allocated_only"] = {str(k): v for k, v in tracker.allocated_only.items() if v}
    return figures


_TOKENS: dict = {}


def resolved_tokens(cfg: grpo.Config, model, processor) -> grpo.Tokens:
    """grpo.Tokens.resolve, once per processor and vocabulary size (it reads the whole vocabulary,
    a second per call: most of a tiny model's measurement)."""
    vocab = model.get_output_embeddings().out_features
    key = (id(processor), vocab, cfg.thinking, cfg.entropy_coef)
    if key not in _TOKENS:
        _TOKENS[key] = grpo.Tokens.resolve(cfg, model, processor)
    return _TOKENS[key]


def steady_state(optimizer, params) -> None:
    """AdamW's states and the gradients as every step after the first finds them: one step on zero
    gradients (moments 0, so no weight moves), the gradients left allocated until the next
    update's zero_grad, as grpo_step leaves them."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()


# ----------------------------------------------------------------------------- extrapolation

def linear(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    """The line through (x0, y0) and (x1, y1) at x (y0 when x0 == x1, a single point)."""
    return y0 if x1 == x0 else y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def predictor(layers, visions, batches, target):
    """value(L, V, B) -> number, known at L in layers (2), V in visions (2), B in batches (1 or 2),
    to its value at target (L, V, B): linear in L and V from (L1, V1), (L2, V1), (L1, V2), then
    linear in B between the two batch sizes."""
    (L1, L2), (V1, V2), (Lt, Vt, Bt) = layers, visions, target

    def predict(value) -> float:
        at_b = {b: value(L1, V1, b) + (Lt - L1) * (value(L2, V1, b) - value(L1, V1, b)) / (L2 - L1)
                + (Vt - V1) * (value(L1, V2, b) - value(L1, V1, b)) / (V2 - V1) for b in batches}
        return linear(batches[0], at_b[batches[0]], batches[-1], at_b[batches[-1]], Bt)
    return predict


def extrapolate(points: dict, layers, visions, batches, target) -> dict:
    """points[(L, V, B)] = {phase: {"segments": {name: {"peak": ..., kind: ...}}, "flops": ...}};
    per phase at target: each segment's figures extrapolated (predictor), the phase's peak the
    largest segment's (with its bytes per kind), and the FLOPs and CPU seconds."""
    predict = predictor(layers, visions, batches, target)
    first = points[(layers[0], visions[0], batches[0])]
    out = {}
    for ph in PHASES:
        segments = {name: {k: predict(lambda L, V, B: points[(L, V, B)][ph]["segments"][name][k])
                           for k in figures}
                    for name, figures in first[ph]["segments"].items()}
        top = max(segments.values(), key=lambda f: f["peak"])
        totals = {k: predict(lambda L, V, B: points[(L, V, B)][ph][k]) for k in ("flops", "cpu_s")}
        out[ph] = {**top, "segments": segments, **totals}
    return out


def check_batch_points(cfg: grpo.Config, batches) -> None:
    """Linear in B holds only where the LM head's chunking is the same: above LOGIT_CHUNK
    positions a forward's logits are recomputed chunk by chunk, below they are one block."""
    K, T = cfg.num_generations, cfg.max_new_tokens

    def positions(b):
        return (cfg.micro_batch or b) * K * T
    want = positions(cfg.batch_size)
    for b in batches:
        got = positions(b)
        if (got > LOGIT_CHUNK) != (want > LOGIT_CHUNK) or (want <= LOGIT_CHUNK and got != want):
            side = f"above {LOGIT_CHUNK}" if want > LOGIT_CHUNK else str(want)
            raise SystemExit(f"fit.py: --batch-points {b}: its training forward scores {got} "
                             f"positions, B {cfg.batch_size}'s {want}; across the LM head's chunk "
                             f"({LOGIT_CHUNK}) memory is not linear in B. Pick batch points whose "
                             f"micro-batch x K x max-new-tokens is {side} too")
        if cfg.micro_batch and b < cfg.micro_batch:
            raise SystemExit(f"fit.py: --batch-points {b} is below --micro-batch {cfg.micro_batch}")


# ----------------------------------------------------------------------------- what it prints

def fsdp_per_rank(pred: dict, ranks: int, config, dtype_bytes: int = 2) -> dict:
    """Arithmetic, not measured: --full under FSDP2 on `ranks` GPUs from the unsharded measurement.
    Weights, gradients and AdamW states divide by the ranks; each rank holds besides bf16 copies of
    the units in use: all of them while sampling (distributed.gathered; counted as a quarter of
    the measured weights, which also hold the bf16 reference: an over-statement), else the root's
    (embeddings, LM head; the one or two layers in flight are left out). The unsharded
    run's activations include autocast's bf16 copies of the weights (cached for a forward), which
    FSDP2 does not make: per rank this over-states them by up to the model's bf16 size."""
    text = config.text_config
    root = text.vocab_size * text.hidden_size * (1 if text.tie_word_embeddings else 2) * dtype_bytes
    out = {}
    for ph, f in pred.items():
        sharded = {k: f[k] / ranks for k in ("weights", "gradients", "optimizer")}
        gathered = pred["sampling"]["weights"] * dtype_bytes / 4 if ph == "sampling" else root
        rest = f["kv_cache"] + f["activations"]
        out[ph] = {**sharded, "kv_cache": f["kv_cache"], "activations": f["activations"] + gathered,
                   "peak": sum(sharded.values()) + rest + gathered}
    return out


def table(pred: dict, gpu_gib: float, seconds: dict) -> str:
    head = " ".join(f"{k:>11}" for k in KINDS)
    rows = [f"{'phase':<10} {head} {'peak GiB':>9} {'est. s':>7}"]
    for ph in PHASES:
        f = pred[ph]
        rows.append(f"{ph:<10} " + " ".join(f"{f[k] / GIB:>11.2f}" for k in KINDS)
                    + f" {f['peak'] / GIB:>9.2f} {seconds[ph]:>7.1f}")
    step = max(pred[ph]["peak"] for ph in PHASES) / GIB
    verdict = "fits" if step <= gpu_gib else "does NOT fit"
    rows.append(f"step peak {step:.2f} GiB of --gpu-memory {gpu_gib:g} GiB: {verdict} "
                f"({gpu_gib - step:+.2f} GiB)")
    return "\n".join(rows)


def advice(pred: dict, gpu_gib: float, cfg: grpo.Config) -> list[str]:
    """What to change, for each phase over the budget, by its largest part."""
    out = []
    for ph in PHASES:
        f = pred[ph]
        if f["peak"] / GIB <= gpu_gib:
            continue
        largest = max(KINDS, key=lambda k: f[k])
        micro = cfg.micro_batch or cfg.batch_size
        training = (f"lower --micro-batch (now {micro} images per forward), --max-pixels or -K; "
                    "--gradient-checkpointing on")
        hint = {"kv_cache": "the KV cache holds B x K rows of prompt + max-new-tokens: lower -B, "
                            "-K, --max-new-tokens or --max-pixels (shorter prompts)",
                "activations": training if ph != "sampling"
                               else "lower -B or -K (decoding rows) or --max-pixels",
                "weights": "a smaller model, or LoRA instead of --full",
                "gradients": "LoRA instead of --full, or --fsdp over more GPUs",
                "optimizer": "LoRA instead of --full, or --fsdp over more GPUs"}[largest]
        out.append(f"{ph}: {f['peak'] / GIB:.2f} GiB > {gpu_gib:g}; largest part {largest} "
                   f"{f[largest] / GIB:.2f} GiB: {hint}; rerun fit.py with it to measure")
    return out


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    ap = grpo.build_parser()
    ap.description = "Peak memory per phase of one GRPO step: real width, reduced depth, CPU."
    g = ap.add_argument_group("fit")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="the GPU's memory, GiB (80)")
    g.add_argument("--images", default="gpu_check",
                   help="gpu_check (B-1 of 512x384, one 4000x3000) or WxH (all of one size)")
    g.add_argument("--text-layers", type=int, nargs=2, default=(1, 2), metavar="L",
                   help="the two language-model depths measured (1 2)")
    g.add_argument("--vision-depths", type=int, nargs=2, default=None, metavar="V",
                   help="vision depths measured (the least keeping every block type, and one more)")
    g.add_argument("--batch-points", type=int, nargs=2, default=None, metavar="B",
                   help="measure at these two batch sizes, extrapolate to -B (default: -B itself)")
    g.add_argument("--exact", action="store_true", help="compute every op (slow; the same bytes)")
    g.add_argument("--fsdp-ranks", type=int, default=0,
                   help="with --full: also the per-rank arithmetic on N GPUs")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak, TFLOP/s (H100/H200: 989)")
    g.add_argument("--mfu", type=float, default=0.4,
                   help="the fraction of that peak the time estimate assumes (0.4)")
    g.add_argument("--json-out", default=None, help="write the measured points and prediction here")
    return ap


def config_from(args) -> grpo.Config:
    names = [f.name for f in dataclasses.fields(grpo.Config)]
    cfg = grpo.Config(**{k: getattr(args, k) for k in names})
    if cfg.fsdp:
        raise SystemExit("fit.py: --fsdp runs under torchrun; --full --fsdp-ranks N gives per rank")
    if args.fsdp_ranks and not cfg.full:
        raise SystemExit("fit.py: --fsdp-ranks is the --full per-rank arithmetic; add --full")
    # the GPU's dtype (grpo's auto is fp32 on a CPU); every completion the full length
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
    return dataclasses.replace(cfg, dtype=dtype, device="cpu", force_length=True)


def run(args) -> dict:
    cfg = config_from(args)
    config = base_config(args.model)
    processor = processor_for(args.model, config)
    Lt, Vt = architectures.depths(config)
    layers = tuple(args.text_layers)
    visions = tuple(args.vision_depths or (architectures.min_vision_depth(config),
                                           architectures.min_vision_depth(config) + 1))
    batches = tuple(args.batch_points or (cfg.batch_size,))
    if layers[0] == layers[1] or visions[0] == visions[1]:
        raise SystemExit("fit.py: --text-layers and --vision-depths each need two different depths")
    check_batch_points(cfg, batches)
    points, t0 = {}, time.perf_counter()
    for b in batches:
        for L, V in ((layers[0], visions[0]), (layers[1], visions[0]), (layers[0], visions[1])):
            t = time.perf_counter()
            points[(L, V, b)] = measure(cfg, config, processor, L, V, b, args.images, args.exact)
            peaks = {ph: round(points[(L, V, b)][ph]["peak"] / GIB, 3) for ph in PHASES}
            print(json.dumps({"measured": {"text_layers": L, "vision_depth": V, "B": b},
                              "peak_gib": peaks, "seconds": round(time.perf_counter() - t, 1)}),
                  flush=True)
    pred = extrapolate(points, layers, visions, batches, (Lt, Vt, cfg.batch_size))
    seconds = {ph: pred[ph]["flops"] / (args.mfu * args.peak_tflops * 1e12) for ph in PHASES}
    point = next(iter(points.values()))
    config_out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "out")}
    target = {"text_layers": Lt, "vision_depth": Vt, "B": cfg.batch_size}
    return {"model": args.model, "target": target,
            "config": config_out, "images": args.images, "prompt_tokens": point["prompt_tokens"],
            "image_tokens": point["image_tokens"],
            "measured": [{"text_layers": L, "vision_depth": V, "B": b,
                          "phases": {ph: f[ph] for ph in PHASES},
                          "allocated_only": f["allocated_only"]}
                         for (L, V, b), f in points.items()],
            "predicted": pred, "seconds_estimate": seconds, "mfu": args.mfu,
            "peak_tflops": args.peak_tflops,
            "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def describe(args, cfg: grpo.Config, result: dict) -> str:
    """The run's settings and what was measured, in two lines above the table."""
    t, micro = result["target"], cfg.micro_batch or cfg.batch_size
    method = "--full" if cfg.full else f"LoRA r{cfg.lora_rank}"
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    measured = sorted({(m["text_layers"], m["vision_depth"], m["B"]) for m in result["measured"]})
    return (f"{args.model}: {t['text_layers']} layers, {t['vision_depth']} vision blocks, "
            f"B {cfg.batch_size}, K {cfg.num_generations}, {cfg.max_new_tokens} new tokens, "
            f"micro-batch {micro}, {method}, gradient checkpointing {checkpointing}, {cfg.dtype}; "
            f"prompt {result['prompt_tokens']} tokens ({result['image_tokens']} image tokens, all "
            f"images), images {args.images}\n"
            f"measured at (layers, vision blocks, B) = {measured}; extrapolated linearly to "
            f"({t['text_layers']}, {t['vision_depth']}, {t['B']}). GiB of live tensors at each "
            "phase's peak (what torch.cuda.max_memory_allocated counts); est. s = FLOPs / "
            f"({args.mfu:g} x {args.peak_tflops:g} TFLOP/s), an estimate (decoding is memory-"
            "bound: sampling takes longer)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads or 2)
    result = run(args)
    cfg, config = config_from(args), base_config(args.model)
    print("\n" + describe(args, cfg, result))
    print(table(result["predicted"], args.gpu_memory, result["seconds_estimate"]))
    judged = result["predicted"]
    if args.fsdp_ranks:
        judged = fsdp_per_rank(result["predicted"], args.fsdp_ranks, config)
        result["fsdp_per_rank"] = {"ranks": args.fsdp_ranks, "phases": judged}
        print(f"\n--fsdp on {args.fsdp_ranks} GPUs, per rank (arithmetic on the figures above, "
              "not measured):")
        print(table(judged, args.gpu_memory, result["seconds_estimate"]))
    for line in advice(judged, args.gpu_memory, cfg):
        print("advice:", line)
    print(f"wall {result['wall_s']} s, peak RSS {result['peak_rss_gib']:.1f} GiB")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
