"""rollouts.py against naive references: per-token log-probs against a full-softmax HF forward, the
sampler's logits against HF's, the shared-prefix path against the plain one (tokens, log-probs,
gradients, with gradient checkpointing too), greedy sampling against `generate`, precomputed
vision features, the completion mask, and the batched vision attention against a per-window loop."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import grpo
import lora
import mgiqa
import rollouts
import tiny
from conftest import (EosBiased, assert_close_grads, cut_row, encode, grads, random_images, randomize_lora, sample, small_cfg,
                      tokens_of)

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_logprobs(model, processor, images, K, ids, mask, temperature, banned):
    """HF forward on K-repeated (prompt, image) pairs + completion, mm_token_type_ids extended by
    zeros (the model computes its own rope positions), then a full softmax per token, in loops."""
    text = mgiqa.prompt_text(processor)
    enc = processor(text=[text] * (len(images) * K), images=[im for im in images for _ in range(K)],
                    padding=True, return_tensors="pt")
    Tp = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([enc["input_ids"], ids], 1),
                       attention_mask=torch.cat([enc["attention_mask"], mask], 1),
                       mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            z = logits[r, Tp - 1 + t].double() / temperature
            z[banned] = -float("inf")
            out[r, t] = torch.log_softmax(z, -1)[ids[r, t]]
    return out


def logprobs(model, p, ids, mask, K, shared, **kw):
    return (rollouts.logprobs_shared if shared else rollouts.logprobs_plain)(model, p, ids, mask, K=K, **kw)


@pytest.mark.parametrize("shared", [True, False])
def test_logprobs_equal_naive_full_softmax(fresh, shared):
    model, processor = fresh
    images, K, temperature = random_images(2), 3, 0.7
    tok = tokens_of(model, processor)
    p, ids, _ = sample(model, processor, images, K, T=10, force_length=True)
    ids = cut_row(ids, 1, 4, tok.eos[0], tok.pad)
    mask = rollouts.completion_mask(ids, tok.eos)
    with torch.no_grad():
        got, ent = logprobs(model, p, ids, mask, K, shared, temperature=temperature, banned=tok.banned)
    want = naive_logprobs(model, processor, images, K, ids, mask, temperature, tok.banned)
    m = mask.bool()
    assert ent is None
    assert want[m].std() > 0.3, "the model is too close to uniform for this comparison to mean anything"
    assert (got.double() - want)[m].abs().max() < 1e-5


def test_precomputed_features_give_the_same_rollouts_and_logprobs(fresh):
    """A frozen tower's output carried by the prompts (the demo's cache) stands in for the pixels:
    same sampled tokens, same log-probs on both paths, also after select()."""
    model, processor = fresh
    images, K = random_images(3), 2
    p = encode(model, processor, images)
    with torch.no_grad():
        cached = dataclasses.replace(p, features=tuple(rollouts.image_features(model, p).pooler_output))
    tok = tokens_of(model, processor)
    ids = {}
    for name, q in (("pixels", p), ("cached", cached)):
        torch.manual_seed(0)
        ids[name] = rollouts.sample_shared(model, q, K=K, max_new_tokens=8, eos_ids=tok.eos, pad_id=tok.pad, banned=tok.banned)
    assert torch.equal(ids["pixels"], ids["cached"])
    mask = rollouts.completion_mask(ids["pixels"], tok.eos)
    rows = [r for i in (2, 0) for r in range(i * K, (i + 1) * K)]
    with torch.no_grad():
        for shared in (True, False):
            want, _ = logprobs(model, p, ids["pixels"], mask, K, shared, banned=tok.banned)
            got, _ = logprobs(model, cached, ids["pixels"], mask, K, shared, banned=tok.banned)
            assert (got - want).abs().max() < 1e-5
            sub, _ = logprobs(model, rollouts.select(cached, [2, 0]), ids["pixels"][rows], mask[rows], K, shared, banned=tok.banned)
            assert (sub - want[rows]).abs().max() < 1e-5
        bad = dataclasses.replace(cached, features=tuple(f + 1.0 for f in cached.features))  # the cache is really used
        assert (logprobs(model, bad, ids["pixels"], mask, K, True, banned=tok.banned)[0] - want).abs().max() > 1e-3


def test_token_logprobs_chunks_banned_and_entropy(fresh):
    model, processor = fresh
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, model.config.get_text_config().hidden_size)
    targets = torch.randint(7, 700, (3, 5))
    tok = tokens_of(model, processor)
    digits = torch.tensor(mgiqa.token_ids(processor, list("12345")))
    with torch.no_grad():
        a, ent = rollouts.token_logprobs(model.lm_head, hidden, targets, 0.5, tok.banned, entropy_ids=digits, chunk=4)
        b, none = rollouts.token_logprobs(model.lm_head, hidden, targets, 0.5, tok.banned)
        z = model.lm_head(hidden).double() / 0.5
    z[..., tok.banned] = -float("inf")
    logp = torch.log_softmax(z, -1)
    assert none is None and (a - b).abs().max() < 1e-6
    assert (a.double() - logp.gather(-1, targets[..., None]).squeeze(-1)).abs().max() < 1e-5
    sub = torch.log_softmax(z[..., digits], -1)  # the entropy over the digits alone, renormalised
    assert (ent.double() - -(sub.exp() * sub).sum(-1)).abs().max() < 1e-5


def test_completion_mask_eos_and_padding():
    eos, pad = 9, 0
    ids = torch.tensor([[5, 6, eos, pad, pad],   # EOS then padding
                        [5, 6, 7, 8, 5],         # no EOS: every token counts
                        [eos, pad, pad, pad, pad],  # EOS first
                        [5, eos, 6, eos, 7]])    # only the first EOS counts
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(rollouts.completion_mask(ids, [eos]), want)
    # pad == eos (tiny-grpo's pitfall): the EOS itself is still in the loss
    same = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    assert torch.equal(rollouts.completion_mask(same, [0]), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(rollouts.completion_mask(torch.tensor([[5, 3, 4, 5]]), [4, 3]), torch.tensor([[1, 1, 0, 0]]))


@pytest.mark.parametrize("shared", [True, False])
def test_sampler_sees_the_models_logits(fresh, shared, monkeypatch):
    """At every decode step the logits handed to the sampler equal a full HF forward's logits over
    the K-repeated prompt + the tokens so far (the cache, positions, padding and masking are right)."""
    model, processor = fresh
    images, K, T = random_images(2), 2, 8
    seen = []
    real = rollouts.sample_tokens
    monkeypatch.setattr(rollouts, "sample_tokens", lambda logits, *a, **kw: seen.append(logits.clone()) or real(logits, *a, **kw))
    _, ids, _ = sample(model, processor, images, K, T, seed=3, temperature=0.8, shared_prefix=shared, force_length=True)
    assert len(seen) == T and len(set(map(tuple, ids.tolist()))) > 1
    enc = processor(text=[mgiqa.prompt_text(processor)] * (len(images) * K), images=[im for im in images for _ in range(K)],
                    padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    with torch.no_grad():
        logits = model(input_ids=torch.cat([enc["input_ids"], ids], 1),
                       attention_mask=torch.cat([enc["attention_mask"], torch.ones_like(ids)], 1),
                       mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits.float()
    Tp, masked = enc["input_ids"].shape[1], mgiqa.banned_token_ids(processor) + mgiqa.eos_ids(model, processor)
    for t in range(T):
        want = logits[:, Tp - 1 + t].clone()
        want[:, masked] = -float("inf")
        assert torch.equal(seen[t].isinf(), want.isinf())
        assert (seen[t] - want)[~want.isinf()].abs().max() < 1e-4, t


@pytest.mark.parametrize("shared", [True, False])
def test_decode_writes_one_preallocated_cache_in_place(fresh, shared, monkeypatch):
    """Every decode step writes into the same key/value storage (a static cache of prompt + T slots),
    never a tensor grown by concatenation."""
    model, processor = fresh
    storage = []
    real = rollouts.lm_hidden

    def spy(model, input_ids, attention_mask, positions, features=None, cache=None):
        out = real(model, input_ids, attention_mask, positions, features, cache)
        if input_ids.shape[1] == 1:  # a decode step
            storage.append((cache.layers[0].keys.data_ptr(), tuple(cache.layers[0].keys.shape)))
        return out
    monkeypatch.setattr(rollouts, "lm_hidden", spy)
    p, ids, _ = sample(model, processor, random_images(2), 3, 8, seed=1, shared_prefix=shared, force_length=True)
    assert len(storage) == 7 and len(set(storage)) == 1
    assert storage[0][1][0] == 6 and storage[0][1][2] == p.input_ids.shape[1] + 8  # (B*K, heads, Tp + T, d)


def test_force_length_gives_full_rows_without_eos(fresh):
    model, processor = fresh
    tok = tokens_of(model, processor)
    model.lm_head = EosBiased(model.lm_head, tok.eos)
    _, ids, mask = sample(model, processor, random_images(2), K=3, T=12)
    assert ids.shape == (6, 1) and torch.isin(ids, torch.tensor(tok.eos)).all()  # every row stops at once
    _, ids, mask = sample(model, processor, random_images(2), K=3, T=12, force_length=True)
    assert ids.shape == (6, 12) and mask.all() and not torch.isin(ids, torch.tensor(tok.eos)).any()
    assert not tok.banned[ids].any() and not (ids == tok.pad).any()


def test_shared_and_plain_sample_the_same_tokens_and_logprobs(fresh):
    """One seed: both samplers draw the same tokens (rows stop at different lengths), and both
    log-prob paths agree on them."""
    model, processor = fresh
    model.lm_head = EosBiased(model.lm_head, tokens_of(model, processor).eos, bias=6.0)  # rows end at different lengths
    images, K = random_images(3), 4
    out = {shared: sample(model, processor, images, K, T=12, seed=7, shared_prefix=shared) for shared in (True, False)}
    (p, ids, mask), (_, ids2, _) = out[True], out[False]
    assert torch.equal(ids, ids2) and len(set(mask.sum(1).tolist())) > 1
    tok = tokens_of(model, processor)
    with torch.no_grad():
        a, _ = rollouts.logprobs_shared(model, p, ids, mask, K=K, banned=tok.banned)
        b, _ = rollouts.logprobs_plain(model, p, ids, mask, K=K, banned=tok.banned)
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def make_trainable(model, mode):
    """"full": every weight trains; "lora_vision": random LoRA adapters, the vision tower's included."""
    if mode == "full":
        model.requires_grad_(True)
    else:
        lora.add_lora(model, rank=4, alpha=8, vision=True)
        randomize_lora(model)


@pytest.mark.parametrize("mode", ["full", "lora_vision"])
def test_shared_prefix_gradient_equals_plain(fresh, mode):
    """One vision pass and one prompt per image, packed with its K completions: the gradient reaching
    every trainable weight, vision tower included, equals the K-times-repeated forward's."""
    model, processor = fresh
    make_trainable(model, mode)
    images, K = random_images(2), 3
    tok = tokens_of(model, processor)
    p, ids, _ = sample(model, processor, images, K, T=8, force_length=True)
    ids = cut_row(ids, 2, 3, tok.eos[0], tok.pad)
    mask = rollouts.completion_mask(ids, tok.eos)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    model.train()
    out = {}
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        logp, _ = logprobs(model, p, ids, mask, K, shared, banned=tok.banned)
        (logp * weights * mask).sum().backward()
        out[shared] = grads(model)
    vision = [n for n in out[True] if ".visual." in f".{n}"]
    assert vision and all(out[True][n].abs().sum() > 0 for n in vision)
    assert_close_grads(out[True], out[False])


def language_model_tokens(model):
    """A counter of the tokens that enter the language model (its input embedding's calls)."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen


@pytest.mark.parametrize("mode", ["full", "lora_vision"])
def test_shared_instruction_runs_once_with_the_plain_paths_logprobs_and_gradients(fresh, mode):
    """Images of one size under one prompt: the instruction before the image is alike in every row and
    runs once for the batch (tokens through the language model S + B (Tp - S + K T)); the log-probs
    and the gradient on every trainable weight equal the plain path's. Rows with left padding, or
    under gradient checkpointing, share nothing."""
    model, processor = fresh
    make_trainable(model, mode)
    images, K, T = random_images(3, sizes=((56, 84),)), 3, 8
    tok = tokens_of(model, processor)
    p, ids, _ = sample(model, processor, images, K, T=T, force_length=True)
    ids = cut_row(ids, 4, 3, tok.eos[0], tok.pad)
    mask = rollouts.completion_mask(ids, tok.eos)
    (B, Tp), S = p.input_ids.shape, rollouts.shared_instruction(model, p)
    vision_start = int((p.input_ids[0] == model.config.vision_start_token_id).nonzero()[0])
    assert S == vision_start > 0  # everything before the image
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    model.train()
    counted, out = language_model_tokens(model), {}
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        counted.clear()
        logp, _ = logprobs(model, p, ids, mask, K, shared, banned=tok.banned)
        (logp * weights * mask).sum().backward()
        out[shared] = (logp.detach(), grads(model), sum(counted))
    assert out[True][2] == S + B * (Tp - S + K * T) and out[False][2] == B * K * (Tp + T)
    assert (out[True][0] - out[False][0])[mask.bool()].abs().max() < 1e-5
    assert_close_grads(out[True][1], out[False][1])
    padded, _, _ = sample(model, processor, random_images(2), K, T=T, force_length=True)
    assert rollouts.shared_instruction(model, padded) == 0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert rollouts.shared_instruction(model, p) == 0


def test_shared_prefix_with_gradient_checkpointing_shares_the_prompt(monkeypatch):
    """grpo.build_model with --gradient-checkpointing: the training forward still packs each prompt
    once with its K completions (tokens through the language model: B (Tp + K T), not B K (Tp + T)),
    with the same log-probs and LoRA gradients as the plain path without checkpointing."""
    cfg = small_cfg(gradient_checkpointing=True)
    torch.manual_seed(0)
    model, processor, _ = grpo.build_model(cfg)
    randomize_lora(model)
    images, K, T = random_images(2), 3, 6
    p, ids, mask = sample(model, processor, images, K, T=T, force_length=True)
    tok = tokens_of(model, processor)
    model.train()
    counted = language_model_tokens(model)
    logp, _ = rollouts.logprobs_shared(model, p, ids, mask, K=K, banned=tok.banned)
    (B, Tp) = p.input_ids.shape
    assert sum(counted) == B * (Tp + K * T)
    logp.sum().backward()
    shared = grads(model)
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_disable()
    counted.clear()
    want, _ = rollouts.logprobs_plain(model, p, ids, mask, K=K, banned=tok.banned)
    assert sum(counted) == B * K * (Tp + T)
    assert (logp - want).abs().max() < 1e-5
    want.sum().backward()
    assert_close_grads(shared, grads(model))


def test_lora_with_gradient_checkpointing_builds_no_graph_through_the_frozen_tower():
    """transformers' gradient checkpointing hooks every input embedding to require grad, the vision
    tower's patch embedding too; grpo.build_model removes that, so backward stops at the adapters."""
    torch.manual_seed(0)
    model, processor, _ = grpo.build_model(small_cfg(gradient_checkpointing=True))
    assert not any(q.requires_grad for q in model.model.visual.parameters())
    seen = {}
    model.model.visual.patch_embed.register_forward_hook(lambda m, a, out: seen.update(patch=out.requires_grad))
    model.model.visual.register_forward_hook(lambda m, a, out: seen.update(tower=out.pooler_output[0].requires_grad))
    p, ids, mask = sample(model, processor, random_images(2), K=2, T=4, force_length=True)
    model.train()
    logp, _ = rollouts.logprobs_shared(model, p, ids, mask, K=2)
    assert logp.requires_grad and seen == {"patch": False, "tower": False}


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_greedy_sampling_equals_generate(name):
    """Our sampler at temperature 0 and transformers' greedy generate give the same tokens, for both
    families with their real processors (images of different sizes: left padding)."""
    model, processor = tiny.build(name, seed=0, init_scale=0.2)
    images = random_images(3, sizes=((64, 96), (96, 96), (64, 64)))
    tok = tokens_of(model, processor)
    p = encode(model, processor, images)
    ours = rollouts.sample_shared(model, p, K=1, max_new_tokens=10, eos_ids=tok.eos, pad_id=tok.pad, banned=tok.banned,
                                  temperature=0.0)
    enc = processor(text=[mgiqa.prompt_text(processor)] * 3, images=images, padding=True, return_tensors="pt")
    gc = mgiqa.plain_generation_config(model)
    gc.update(**mgiqa.decoding_settings(0.0, 10), eos_token_id=tok.eos, pad_token_id=tok.pad,
              suppress_tokens=mgiqa.banned_token_ids(processor, model.get_output_embeddings().out_features))
    with torch.no_grad():
        theirs = model.generate(**enc, generation_config=gc)[:, enc["input_ids"].shape[1]:]
    assert len(set(map(tuple, ours.tolist()))) > 1  # the images get different answers
    T = max(ours.shape[1], theirs.shape[1])
    pad = lambda x: F.pad(x, (0, T - x.shape[1]), value=tok.pad)  # noqa: E731
    assert torch.equal(pad(ours), pad(theirs))


@pytest.mark.parametrize("lengths", [[5, 3, 5, 2, 3, 64], [4, 4, 4]])
@pytest.mark.parametrize("given", [False, True])  # the longest window passed in (as the tower does) or found
def test_batched_vision_attention_equals_one_sequence_at_a_time(lengths, given, monkeypatch):
    torch.manual_seed(0)
    H, d = 2, 8
    q, k, v = (torch.randn(1, H, sum(lengths), d) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    got, _ = rollouts._varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu, max_length_q=max(lengths) if given else None)
    monkeypatch.undo()
    assert len(calls) == 1  # one call for all windows, whatever their lengths
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]).transpose(1, 2)
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-6


def test_block_mask_by_hand():
    """Two prompt slots (one padded) and K = 2 completions of 2 tokens, the second cut after 1."""
    m = rollouts.block_mask(torch.tensor([[0, 1]]), torch.tensor([[[1, 1], [1, 0]]]))[0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0],   # the pad slot sees only itself
                         [0, 1, 0, 0, 0, 0],   # the prompt token
                         [0, 1, 1, 0, 0, 0],   # completion 1, token 0
                         [0, 1, 1, 1, 0, 0],   # completion 1, token 1
                         [0, 1, 0, 0, 1, 0],   # completion 2, token 0: not completion 1
                         [0, 1, 0, 0, 1, 1]])  # completion 2's padded token: the prompt, its own row's token 0, itself
    assert torch.equal(m, want)


def zero_deepstack(features):
    """The same vision output with Qwen3-VL's deepstack features zeroed (what a path that injects image
    features itself and drops them would compute)."""
    zero = lambda x: torch.zeros_like(x) if torch.is_tensor(x) else type(x)(zero(y) for y in x)  # noqa: E731
    features.deepstack_features = zero(features.deepstack_features)
    return features


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_training_logprobs_equal_the_models_own_forward(name, gradient_checkpointing, monkeypatch):
    """Both families with their real processors: the per-token log-probs of the plain and the
    shared-prefix path (with and without gradient checkpointing, in train mode) equal the model's own
    forward(input_ids, pixel_values, image_grid_thw, attention_mask) -> log-softmax. For Qwen3-VL the
    comparison fails once the deepstack features are zeroed: the test sees them dropped."""
    model, processor = tiny.build(name, seed=0, init_scale=0.2)
    images, K = random_images(2, sizes=((64, 96), (96, 96))), 2
    tok = tokens_of(model, processor)
    p, ids, _ = sample(model, processor, images, K, T=6, force_length=True)
    ids = cut_row(ids, 1, 3, tok.eos[0], tok.pad)
    mask = rollouts.completion_mask(ids, tok.eos)
    want = naive_logprobs(model, processor, images, K, ids, mask, 1.0, tok.banned)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    m = mask.bool()
    for shared in (True, False):
        got, _ = logprobs(model, p, ids, mask, K, shared, banned=tok.banned)
        assert (got.detach().double() - want)[m].abs().max() < 1e-4, shared
    if name == "tiny-qwen3-vl":
        real = rollouts.image_features
        monkeypatch.setattr(rollouts, "image_features", lambda model, p: zero_deepstack(real(model, p)))
        dropped, _ = logprobs(model, p, ids, mask, K, True, banned=tok.banned)
        assert (dropped.detach().double() - want)[m].abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_vision_gives_the_stock_towers_output(dtype):
    """Two photos of different sizes: windows of several lengths (edge windows are short) and a
    full-attention layer over images of different lengths; the one-call attention and the matmul
    patch embedding give the stock tower's output (bf16: to its rounding)."""
    import copy

    from PIL import Image
    model, processor = tiny.build("tiny-qwen2.5-vl", seed=0, init_scale=0.2)
    model = model.to(dtype)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 420), (196, 252))]
    enc = processor.image_processor(images=images, return_tensors="pt")
    fast = copy.deepcopy(model)
    rollouts.fast_vision(fast)
    assert fast.model.visual.config._attn_implementation == "flash_varlen_sdpa"  # no CUDA here: our batched sdpa
    with torch.no_grad():
        want = model.model.visual(enc["pixel_values"].to(dtype), grid_thw=enc["image_grid_thw"])
        got = fast.model.visual(enc["pixel_values"].to(dtype), grid_thw=enc["image_grid_thw"])
    want, got = (getattr(o, "pooler_output", o) for o in (want, got))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert got.shape == want.shape and ((got.float() - want.float()).abs().max() / want.float().abs().max()) < tol
