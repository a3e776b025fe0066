"""GRPO (docs/METHOD.md, section 3): the math by hand, log-probs against a naive
full-softmax forward, the shared-prefix path against the straightforward one (values and gradients),
LoRA, checkpoints and exact resume, a crash mid-write, a 2-rank gloo torchrun run, PEFT layout, merge.

Rewards: an untrained model never writes the answer layout, so reward.mg_reward would give 0 to
every rollout and no gradient at all; tests that need a learning signal patch in `text_reward`, a
deterministic function of the completion text (same text, same reward)."""
import copy
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import grpo
import lora
import mgiqa
import parallel
import reward
import rollouts
import step
from mgiqa import ATTRIBUTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers

def text_reward(completions, P, M, *args, **kwargs):
    """A stand-in for reward.mg_reward with the same output keys: total = a hash of the text in [0, 1)."""
    B = P.shape[1]
    K = len(completions) // B
    total = torch.tensor([(sum(map(ord, c)) % 97) / 97 for c in completions]).view(B, K)
    A = len(ATTRIBUTES)
    return {"total": total, "per_attribute": total[..., None].expand(B, K, A) / A, "format": torch.zeros(B, K),
            "scores": torch.full((B, K, A), float("nan"))}


def widen(model, seed=0):
    """An untrained tiny model is nearly uniform over the vocabulary; wider weights make the
    comparisons below sensitive (matrices only: norms stay at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def random_images(n=2, seed=0):
    """Different sizes, so prompts differ in length and left padding is exercised."""
    rng = np.random.default_rng(seed)
    sizes = [(56, 84), (84, 84), (56, 56), (84, 56)]  # 6, 9, 4, 6 image tokens
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def sample(model, processor, images, K=3, T=10, seed=0, **kw):
    p = rollouts.encode_prompts(model, processor, images)
    eos, pad = mgiqa.eos_ids(model, processor), processor.tokenizer.pad_token_id
    torch.manual_seed(seed)
    ids = rollouts.rollout(model, p, K, T, eos, pad, mgiqa.banned_token_ids(processor), **kw)
    return p, ids, rollouts.completion_mask(ids, eos)


def cut_row(ids, row, at, eos, pad):
    """Row `row` ends with EOS at position `at`, padding after (so masks and padding are exercised)."""
    ids = ids.clone()
    ids[row, at] = eos
    ids[row, at + 1:] = pad
    return ids


def full_logits(model, processor, images):
    enc = processor(text=[mgiqa.prompt_text(processor)] * len(images), images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_close_grads(a, b, rel=1e-4):
    assert a.keys() == b.keys() and a
    for n in a:
        scale = b[n].abs().max().clamp(min=1e-12)
        err = (a[n] - b[n]).abs().max() / scale
        assert err < rel, f"{n}: relative gradient error {err:.2e}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine a busy
    neighbour made 2-thread steps 5x slower than 1-thread ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    return widen(model), processor


@pytest.fixture
def fresh(base):
    return copy.deepcopy(base[0]), base[1]


def small_cfg(**kw):
    return {**grpo.DEFAULTS, "model": "tiny", "batch_size": 2, "num_generations": 3, "max_new_tokens": 8,
            "lr": 1e-2, "lora_rank": 4, "lora_alpha": 8, **kw}


def fake_batch(B):
    A = len(ATTRIBUTES)
    return {"P": torch.full((A, B, B), 0.5), "M": torch.zeros(A, B, B, dtype=torch.bool)}


# ----------------------------------------------------------------------------- log-probs

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


@pytest.mark.parametrize("shared", [True, False])
def test_logprobs_equal_naive_full_softmax(fresh, shared):
    model, processor = fresh
    images, K, temperature = random_images(2), 3, 0.7
    eos, pad, banned = mgiqa.eos_ids(model, processor)[0], processor.tokenizer.pad_token_id, mgiqa.banned_token_ids(processor)
    p, ids, _ = sample(model, processor, images, K, T=10)
    ids = cut_row(ids, 1, 4, eos, pad)
    mask = rollouts.completion_mask(ids, [eos])
    with torch.no_grad():
        got = rollouts.completion_logprobs(model, p, K, ids, mask, temperature, banned, shared_prefix=shared)
    want = naive_logprobs(model, processor, images, K, ids, mask, temperature, banned)
    m = mask.bool()
    assert want[m].std() > 0.3, "the model is too close to uniform for this comparison to mean anything"
    assert (got.double() - want)[m].abs().max() < 1e-5


def test_precomputed_features_give_the_same_rollouts_and_logprobs(fresh):
    """A frozen tower's output carried by the prompts (the demo's cache) stands in for the pixels:
    same sampled tokens, same log-probs on both paths, also after select()."""
    import dataclasses

    model, processor = fresh
    images, K = random_images(3), 2
    p = rollouts.encode_prompts(model, processor, images)
    with torch.no_grad():
        cached = dataclasses.replace(p, features=tuple(rollouts.image_features(model, p).pooler_output))
    eos, pad, banned = mgiqa.eos_ids(model, processor), processor.tokenizer.pad_token_id, mgiqa.banned_token_ids(processor)
    ids = {}
    for name, q in (("pixels", p), ("cached", cached)):
        torch.manual_seed(0)
        ids[name] = rollouts.rollout(model, q, K, 8, eos, pad, banned)
    assert torch.equal(ids["pixels"], ids["cached"])
    mask = rollouts.completion_mask(ids["pixels"], eos)
    rows = [r for i in (2, 0) for r in range(i * K, (i + 1) * K)]
    with torch.no_grad():
        for shared in (True, False):
            want = rollouts.completion_logprobs(model, p, K, ids["pixels"], mask, 1.0, banned, shared)
            got = rollouts.completion_logprobs(model, cached, K, ids["pixels"], mask, 1.0, banned, shared)
            assert (got - want).abs().max() < 1e-5
            sub = rollouts.completion_logprobs(model, rollouts.select(cached, [2, 0]), K, ids["pixels"][rows], mask[rows], 1.0,
                                               banned, shared)
            assert (sub - want[rows]).abs().max() < 1e-5
    bad = dataclasses.replace(cached, features=tuple(f + 1.0 for f in cached.features))  # the cache is really used
    with torch.no_grad():
        assert (rollouts.completion_logprobs(model, bad, K, ids["pixels"], mask, 1.0, banned) - want).abs().max() > 1e-3


def test_token_logprobs_chunks_banned_and_entropy(fresh):
    model, processor = fresh
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, model.config.get_text_config().hidden_size)
    targets = torch.randint(7, 700, (3, 5))
    banned = mgiqa.banned_token_ids(processor)
    with torch.no_grad():
        a, ent = rollouts.token_logprobs(model.lm_head, hidden, targets, 0.5, banned, chunk=4, entropy=True)
        b = rollouts.token_logprobs(model.lm_head, hidden, targets, 0.5, banned)
        z = model.lm_head(hidden).double() / 0.5
    z[..., banned] = -float("inf")
    logp = torch.log_softmax(z, -1)
    assert (a - b).abs().max() < 1e-6
    assert (a.double() - logp.gather(-1, targets[..., None]).squeeze(-1)).abs().max() < 1e-5
    want_ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    assert (ent.double() - want_ent).abs().max() < 1e-5


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
    # several EOS ids
    assert torch.equal(rollouts.completion_mask(torch.tensor([[5, 3, 4, 5]]), [4, 3]), torch.tensor([[1, 1, 0, 0]]))


def test_score_token_attributes_marks_each_scores_digits(base):
    """Against a naive reference that decodes every prefix of the row: a token belongs to attribute
    a when the text it adds lies inside a's number after the last <answer> (anywhere if none)."""
    tok = base[1].tokenizer
    texts = ['<think>dull</think><answer>{"sharpness": 4, "color": 2, "noise": 5, "composition": 3.5, "overall": 12}</answer><|im_end|>',
             '<answer>{"noise": 1}</answer> <answer>{"overall": 3, "sharpness": 4.25}</answer><|im_end|>',  # only the last answer counts
             'no tags: "overall": 3<|im_end|>',
             '<answer>{"colour": 3, "color": 2}</answer><|im_end|>']
    rows = [tok(t).input_ids for t in texts]
    Tc = max(map(len, rows)) + 2
    ids = torch.tensor([r + [tok.pad_token_id] * (Tc - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (Tc - len(r)) for r in rows])
    got = reward.score_token_attributes(tok, ids, mask)
    number = re.compile(r'"(' + "|".join(ATTRIBUTES) + r')": ([0-9.]+)')
    for r, row in enumerate(rows):
        text = tok.decode(row)
        start = text.rfind("<answer>")
        spans = [(m.span(2), ATTRIBUTES.index(m.group(1))) for m in number.finditer(text) if m.start() > start]
        want = []
        for t in range(Tc):
            lo, hi = len(tok.decode(row[:t])), len(tok.decode(row[:t + 1])) if t < len(row) else -1
            want.append(next((a for (s, e), a in spans if lo < e and hi > s), -1))
        assert got[r].tolist() == want, (texts[r], got[r].tolist(), want)
    assert sorted(set(got[0].tolist()) - {-1}) == [0, 1, 2, 3, 4] and set(got[2].tolist()) == {-1, 4}
    assert sorted(set(got[1].tolist()) - {-1}) == [0, 4]  # the first answer's noise score is not marked


# ----------------------------------------------------------------------------- the loss

def test_k3_nonnegative_and_zero_at_equality():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    kl = step.k3_kl(logp, ref)
    assert (kl >= 0).all() and kl.max() > 0.1
    assert torch.equal(step.k3_kl(logp, logp), torch.zeros(1000))
    d = ref - logp  # hand formula
    assert torch.allclose(kl, torch.exp(d) - d - 1)
    assert abs(step.k3_kl(torch.tensor(0.0), torch.log(torch.tensor(2.0))).item() - (2 - np.log(2) - 1)) < 1e-6


def test_clipping_only_outside_the_band_in_the_advantages_direction():
    eps_low, eps_high = 0.2, 0.3
    rho = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.29, 1.31, 2.0])
    logp, old = torch.log(rho), torch.zeros(7)
    for sign in (1.0, -1.0):
        adv = torch.full((7,), 2.0 * sign)
        loss, clipped = step.clipped_surrogate(logp, old, adv, eps_low, eps_high)
        if sign > 0:  # a good action: only a ratio above 1 + eps_high is capped
            want_clip = rho > 1 + eps_high
        else:  # a bad action: only a ratio below 1 - eps_low is capped
            want_clip = rho < 1 - eps_low
        assert torch.equal(clipped, want_clip), (sign, clipped)
        want = -torch.where(want_clip, rho.clamp(1 - eps_low, 1 + eps_high), rho) * adv
        assert torch.allclose(loss, want, atol=1e-6)
        # the gradient vanishes exactly on clipped tokens
        lp = logp.clone().requires_grad_(True)
        step.clipped_surrogate(lp, old, adv, eps_low, eps_high)[0].sum().backward()
        assert torch.equal(lp.grad == 0, want_clip)


def test_aggregations_agree_when_lengths_are_equal():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    full = torch.ones(4, 6)
    values = [step.aggregate(x, full, m) for m in ("grpo", "bnpo", "dr_grpo")]
    assert torch.allclose(values[0], values[1]) and torch.allclose(values[0], values[2])
    assert torch.allclose(values[0], x.mean())
    ragged = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 6, [1] * 3 + [0] * 3])
    g, b, d = (step.aggregate(x, ragged, m) for m in ("grpo", "bnpo", "dr_grpo"))
    rows = [x[i, :int(ragged[i].sum())].mean() for i in range(4)]
    assert torch.allclose(g, torch.stack(rows).mean())
    assert torch.allclose(b, x[ragged.bool()].mean())
    assert torch.allclose(d, x[ragged.bool()].sum() / 24)
    assert not torch.allclose(g, b)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        step.aggregate(x, full, "mean")


# ----------------------------------------------------------------------------- rollouts

@pytest.mark.parametrize("shared", [True, False])
def test_rollout_samples_the_models_distribution(fresh, shared, monkeypatch):
    """At every decode step the logits handed to the sampler equal a full HF forward's logits over
    the K-repeated prompt + the tokens so far (the cache, positions, padding and masking are right)."""
    model, processor = fresh
    images, K, T = random_images(2), 2, 8
    seen = []
    real = rollouts.sample_tokens
    monkeypatch.setattr(rollouts, "sample_tokens", lambda logits, *a, **kw: seen.append(logits.clone()) or real(logits, *a, **kw))
    _, ids, _ = sample(model, processor, images, K, T, seed=3, temperature=0.8, shared_prefix=shared, force_length=True)
    assert len(seen) == T and len(set(map(tuple, ids.tolist()))) > 1
    text = mgiqa.prompt_text(processor)
    enc = processor(text=[text] * (len(images) * K), images=[im for im in images for _ in range(K)],
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


class EosBiased(torch.nn.Module):
    """An LM head that makes EOS (nearly) certain."""

    def __init__(self, head, eos):
        super().__init__()
        self.head, self.eos = head, eos

    def forward(self, x):
        out = self.head(x).clone()
        out[..., self.eos] += 30.0
        return out


def test_force_length_gives_full_rows_without_eos(fresh):
    model, processor = fresh
    eos, pad = mgiqa.eos_ids(model, processor), processor.tokenizer.pad_token_id
    model.lm_head = EosBiased(model.lm_head, eos)
    _, ids, mask = sample(model, processor, random_images(2), K=3, T=12)
    assert ids.shape == (6, 1) and torch.isin(ids, torch.tensor(eos)).all()  # every row stops at once
    _, ids, mask = sample(model, processor, random_images(2), K=3, T=12, force_length=True)
    assert ids.shape == (6, 12) and mask.all() and not torch.isin(ids, torch.tensor(eos)).any()
    assert not torch.isin(ids, torch.tensor(mgiqa.banned_token_ids(processor) + [pad])).any()


# ----------------------------------------------------------------------------- shared prefix == straightforward

def test_shared_and_straightforward_paths_agree(fresh, monkeypatch):
    """Same seed: the same rollouts, rewards, advantages; log-probs within 1e-5; one grpo_step
    gives the same loss, KL and gradients."""
    monkeypatch.setattr(reward, "mg_reward", text_reward)
    model, processor = fresh
    lora.add_lora(model, rank=4, alpha=8)
    randomize_lora(model)  # so the reference (adapters off) differs and the KL term is live
    images, K = random_images(2), 3
    cfg = small_cfg(num_generations=K, max_new_tokens=10, lr=0.0)
    out = {}
    for shared in (True, False):
        m = copy.deepcopy(model)
        p, ids, mask = sample(m, processor, images, K, T=10, shared_prefix=shared)
        completions = mgiqa.decode_completions(processor, ids, mgiqa.eos_ids(m, processor))
        rewards = text_reward(completions, fake_batch(2)["P"], None)
        adv = reward.token_advantages(rewards, torch.full_like(ids, -1))
        m.train()
        with torch.no_grad():
            logp = rollouts.completion_logprobs(m, p, K, ids, mask, 1.0, mgiqa.banned_token_ids(processor), shared)
        torch.manual_seed(5)
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=0.0)
        stats = step.grpo_step({**cfg, "straightforward": not shared}, parallel.Policy(m), processor,
                               fake_batch(2), images, text_reward, optimizer=opt)
        out[shared] = dict(ids=ids, rewards=rewards["total"], adv=adv, logp=logp, stats=stats, grads=grads(m))
    a, b = out[True], out[False]
    assert torch.equal(a["ids"], b["ids"])
    assert torch.equal(a["rewards"], b["rewards"]) and a["rewards"].std() > 0
    assert torch.equal(a["adv"], b["adv"])
    assert (a["logp"] - b["logp"]).abs().max() < 1e-5
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert abs(a["stats"][key] - b["stats"][key]) <= 1e-5 * max(1.0, abs(b["stats"][key])), key
    assert a["stats"]["kl"] > 0
    assert_close_grads(a["grads"], b["grads"])


@pytest.mark.parametrize("mode", ["full", "lora_vision"])
def test_shared_prefix_gradient_equals_straightforward(fresh, mode):
    """One vision pass per image, its features and prompt KV cache expanded to K rows: the gradient
    reaching every trainable weight, vision tower included, equals the K-times-repeated forward's."""
    model, processor = fresh
    if mode == "full":
        model.requires_grad_(True)
    else:
        lora.add_lora(model, rank=4, alpha=8, vision=True)
        randomize_lora(model)
    images, K = random_images(2), 3
    p, ids, mask = sample(model, processor, images, K, T=8)
    ids = cut_row(ids, 2, 3, mgiqa.eos_ids(model, processor)[0], processor.tokenizer.pad_token_id)
    mask = rollouts.completion_mask(ids, mgiqa.eos_ids(model, processor))
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))
    model.train()
    out = {}
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        logp = rollouts.completion_logprobs(model, p, K, ids, mask, 1.0, mgiqa.banned_token_ids(processor), shared)
        (logp * weights * mask).sum().backward()
        out[shared] = grads(model)
    vision = [n for n in out[True] if ".visual." in f".{n}"]
    assert vision and all(out[True][n].abs().sum() > 0 for n in vision)
    assert_close_grads(out[True], out[False])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_shared_prefix_with_gradient_checkpointing(fresh):
    """HF's gradient checkpointing drops the KV cache inside checkpointed layers while grad is on;
    the training forward must still see the prompt (values and gradients as without it)."""
    model, processor = fresh
    lora.add_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    images, K = random_images(2), 2
    p, ids, mask = sample(model, processor, images, K, T=6)
    banned = mgiqa.banned_token_ids(processor)
    model.train()
    logp0 = rollouts.completion_logprobs(model, p, K, ids, mask, 1.0, banned, False)
    logp0.sum().backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as grpo.build_model
    model.train()
    logp = rollouts.completion_logprobs(model, p, K, ids, mask, 1.0, banned, True)
    assert (logp - logp0).abs().max() < 1e-5
    logp.sum().backward()
    assert_close_grads(grads(model), want)


# ----------------------------------------------------------------------------- LoRA and the reference

def test_reference_with_adapters_disabled_equals_base(fresh):
    base_model, processor = fresh
    model = copy.deepcopy(base_model)
    wrapped = lora.add_lora(model, rank=4, alpha=8)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(lora.LM_TARGETS) and not any(".visual." in f".{n}" for n in wrapped)
    randomize_lora(model)
    images, K = random_images(2), 2
    p, ids, mask = sample(base_model, processor, images, K, T=8)
    banned = mgiqa.banned_token_ids(processor)
    with torch.no_grad():
        lp = lambda m: rollouts.completion_logprobs(m, p, K, ids, mask, 1.0, banned)  # noqa: E731
        base_lp, policy_lp = lp(base_model), lp(model)
        with lora.adapters_disabled(model):
            ref_lp = lp(model)
        again = lp(model)
    assert torch.equal(ref_lp, base_lp)
    assert (policy_lp - base_lp).abs().max() > 1e-2  # the adapters matter
    assert torch.equal(again, policy_lp)  # and are back on after the context


def test_one_step_changes_lora_weights_and_nothing_else(monkeypatch):
    monkeypatch.setattr(reward, "mg_reward", text_reward)
    cfg = small_cfg()
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    assert ref is None
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg["lr"])
    policy = parallel.Policy(model)
    images = random_images(2)
    for i in range(2):  # lora_B starts at 0, so lora_A's gradient is 0 until B has moved
        torch.manual_seed(i)
        step.grpo_step(cfg, policy, processor, fake_batch(2), images, text_reward, optimizer=opt)
    after = model.state_dict()
    for n in before:
        if ".lora_" in n:
            assert not torch.equal(before[n], after[n]), f"{n} did not change"
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed but is not a LoRA weight"


def test_full_step_changes_trainable_weights_not_the_reference(monkeypatch):
    monkeypatch.setattr(reward, "mg_reward", text_reward)
    cfg = small_cfg(full=True, lr=1e-3)
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    assert ref is not None and not any(q.requires_grad for q in ref.parameters())
    assert all(q.requires_grad for q in model.parameters())
    before, ref_before = copy.deepcopy(model.state_dict()), copy.deepcopy(ref.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    torch.manual_seed(0)
    step.grpo_step(cfg, parallel.Policy(model), processor, fake_batch(2), random_images(2), text_reward,
                   ref=parallel.Policy(ref), optimizer=opt)
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    unchanged = [n for n in params if torch.equal(before[n], after[n])]
    assert not unchanged, f"trainable weights that did not move: {unchanged}"
    assert any(".visual." in f".{n}" for n in params)
    for n, t in ref.state_dict().items():
        assert torch.equal(t, ref_before[n]), f"reference weight {n} changed"


def test_peft_layout_adapter_loads_back(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    model, processor, _ = grpo.build_model(cfg)  # tiny_vlm(0): the model mgiqa.load("tiny") rebuilds
    randomize_lora(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", 4, 8, 0.0, "tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    assert set(config["target_modules"]) == wrapped and not any(".visual." in f".{n}." for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(lora.LM_TARGETS)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, value in weights.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        assert m, key
        lin = modules[m.group(1)].base
        assert value.shape == ((4, lin.in_features) if m.group(2) == "A" else (lin.out_features, 4))
    images = random_images(2)
    want = full_logits(model, processor, images)
    loaded, _ = mgiqa.load("tiny", device="cpu", adapter=str(tmp_path / "adapter"))
    got = full_logits(loaded, processor, images)
    assert (want - full_logits(mgiqa.tiny_vlm(0, "tiny")[0], processor, images)).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4
    again, _, _ = grpo.build_model(cfg)  # into a wrapped model (what resume does)
    lora.load_adapter_weights(again, tmp_path / "adapter")
    assert (full_logits(again, processor, images) - want).abs().max() < 1e-6


def test_peft_loads_our_adapter_with_our_logits_and_merge(tmp_path):
    """PEFT reads the adapter grpo.py writes: the same logits (1e-5), adapters on exactly the
    modules we trained, and PEFT's merge_and_unload equals ours (1e-6 on the weights)."""
    import peft  # test-only requirement (requirements.txt)
    base, processor = mgiqa.tiny_vlm(0, "tiny")
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    model, _ = mgiqa.load(str(tmp_path / "base"), device="cpu")
    lora.add_lora(model, rank=4, alpha=8)
    randomize_lora(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", 4, 8, 0.0, str(tmp_path / "base"))
    images = random_images(2)
    ours = full_logits(model, processor, images)
    plain, _ = mgiqa.load(str(tmp_path / "base"), device="cpu")
    theirs_model = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    theirs = full_logits(theirs_model, processor, images)
    assert (ours - full_logits(mgiqa.load(str(tmp_path / "base"), device="cpu")[0], processor, images)).abs().max() > 1e-2
    assert (theirs - ours).abs().max() < 1e-5
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in theirs_model.named_modules()
                    if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    assert peft_wrapped == {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    merged_theirs = theirs_model.merge_and_unload().state_dict()
    merged_ours = lora.merge_lora(model).state_dict()
    assert merged_theirs.keys() == merged_ours.keys()
    for n in merged_ours:
        assert (merged_theirs[n] - merged_ours[n]).abs().max() < 1e-6, n


def test_merged_checkpoint_gives_base_plus_adapter_logits(fresh, tmp_path):
    model, processor = fresh
    lora.add_lora(model, rank=4, alpha=8, vision=True)
    randomize_lora(model, std=0.2)
    images = random_images(2)
    want = full_logits(model, processor, images)
    with lora.adapters_disabled(model):
        assert (full_logits(model, processor, images) - want).abs().max() > 1e-2
    checkpoint.save_merged(model, processor, str(tmp_path / "merged"))
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    loaded, loaded_processor = mgiqa.load(str(tmp_path / "merged"), device="cpu")
    assert not any("lora" in n for n in loaded.state_dict())
    assert (full_logits(loaded, loaded_processor, images) - want).abs().max() < 1e-4


# ----------------------------------------------------------------------------- the loop, checkpoints, resume

class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def synthetic():
    arrays, records = data.synthesize(24, 56, seed=0)
    by_name = {r.image: a for r, a in zip(records, arrays)}
    return [r for r in records if r.split == "train"], lambda recs: [Image.fromarray(by_name[r.image]) for r in recs]


def run_train(out, synthetic, log=None, seed_noise=0):
    """A fresh process's worth of state: model, sampler and RNGs built anew (seed_noise scrambles
    what a resume must restore from the checkpoint)."""
    records, images_of = synthetic
    cfg = small_cfg(out=str(out), steps=6, save_every=3, keep=2, num_generations=2, max_new_tokens=6, lr=5e-3)
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    sampler = data.Sampler({"synthetic": records}, cfg["batch_size"], seed=seed_noise)
    random.seed(seed_noise), np.random.seed(seed_noise), torch.manual_seed(100 + seed_noise)
    lines = []
    history = grpo.train(cfg, model, processor, sampler, images_of=images_of, ref_model=ref, log=log or lines.append)
    return model, history, lines


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(reward, "mg_reward", text_reward)
    try:
        model, history, _ = run_train(tmp_path_factory.mktemp("straight"), synthetic)
    finally:
        mp.undo()
    return checkpoint.trainable_state(model), history


def assert_same_run(model, history, uninterrupted):
    state, want_history = uninterrupted
    got = checkpoint.trainable_state(model)
    assert got.keys() == state.keys()
    assert any(t.abs().sum() > 0 for n, t in state.items() if ".lora_B" in n)  # it did learn something
    for n in state:
        assert torch.equal(got[n], state[n]), f"{n} differs from the uninterrupted run"
    assert [h["step"] for h in history] == [4, 5, 6]
    assert [h["reward"] for h in history] == [h["reward"] for h in want_history[3:]]


def test_resume_at_step_3_is_bit_identical(synthetic, uninterrupted, tmp_path, monkeypatch):
    monkeypatch.setattr(reward, "mg_reward", text_reward)

    def crash_at_4(line):
        if line.startswith("step     4"):
            raise Crash(line)

    with pytest.raises(Crash):
        run_train(tmp_path, synthetic, log=crash_at_4)
    assert checkpoint.checkpoints(tmp_path) == [3]
    model, history, lines = run_train(tmp_path, synthetic, seed_noise=7)
    assert lines[0].startswith("resumed from") and lines[0].endswith("at step 3")
    assert_same_run(model, history, uninterrupted)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 6


def test_crash_during_checkpoint_write_resumes_from_previous(synthetic, uninterrupted, tmp_path, monkeypatch):
    monkeypatch.setattr(reward, "mg_reward", text_reward)
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):
        if "checkpoint-6.tmp" in str(path):
            raise Crash("killed while writing checkpoint-6")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Crash):
        run_train(tmp_path, synthetic)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint-6.tmp").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert checkpoint.checkpoints(tmp_path) == [3]
    model, history, lines = run_train(tmp_path, synthetic, seed_noise=3)
    assert "checkpoint-3 at step 3" in lines[0]
    assert_same_run(model, history, uninterrupted)
    assert checkpoint.checkpoints(tmp_path) == [3, 6] and not (tmp_path / "checkpoint-6.tmp").exists()


def test_evaluation_during_training_draws_from_every_dataset(tmp_path):
    for name in ("alpha", "beta"):
        data.make_synthetic(str(tmp_path / name), 20, 56, seed=len(name), dataset=name)
    out = tmp_path / "run"
    code = grpo.main(["--data", f"manifest={tmp_path / 'alpha'}", f"manifest={tmp_path / 'beta'}", "--out", str(out),
                      "--steps", "2", "-B", "2", "-K", "2", "--max-new-tokens", "4", "--lora-rank", "4",
                      "--eval-every", "2", "--eval-limit", "6", "--save-every", "0"])
    assert code == 0
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert "eval" not in log[0] and set(log[1]["eval"]) == {"alpha", "beta"}
    assert sum(d["n"] for d in log[1]["eval"].values()) == 6
    assert {p.name for p in out.glob("split-*.csv")} == {"split-alpha.csv", "split-beta.csv"}
    json.loads((out / "log.jsonl").read_text().splitlines()[1], parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
