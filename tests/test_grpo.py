"""grpo.py against its equations (docs/METHOD.md, section 3): the loss by hand, per-attribute credit by
hand, micro-batches that add up to the full batch, a second iteration that clips against the policy
that sampled, the shared-prefix step against the plain one, LoRA and --full steps, the reference,
checkpoints and exact resume, a crash mid-write, evaluation during training, the configuration, and
the GPU path's numerics shown on the CPU (fp32 trainable state under bf16 compute, through grpo.main).

Rewards: an untrained model never writes the answer layout, so reward.mg_reward would give 0 to every
rollout and no gradient; tests that need a learning signal pass `text_reward` (conftest.py)."""
import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import distributed
import grpo
import lora
import mgiqa
import reward
import rollouts
import synth
from conftest import (EosBiased, assert_close_grads, encode, fake_batch, grads, random_images, randomize_lora, small_cfg,
                      text_reward)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the loss, by hand

def test_k3_nonnegative_and_zero_at_equality():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 5, -torch.rand(1000) * 5
    kl = grpo.k3_kl(logp, ref)
    assert (kl >= 0).all() and kl.max() > 0.1
    assert torch.equal(grpo.k3_kl(logp, logp), torch.zeros(1000))
    d = ref - logp  # hand formula
    assert torch.allclose(kl, torch.exp(d) - d - 1)
    assert abs(grpo.k3_kl(torch.tensor(0.0), torch.log(torch.tensor(2.0))).item() - (2 - np.log(2) - 1)) < 1e-6


def test_clipping_only_outside_the_band_in_the_advantages_direction():
    eps_low, eps_high = 0.2, 0.3
    rho = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.29, 1.31, 2.0])
    logp, old = torch.log(rho), torch.zeros(7)
    for sign in (1.0, -1.0):
        adv = torch.full((7,), 2.0 * sign)
        loss, clipped = grpo.clipped_surrogate(logp, old, adv, eps_low, eps_high)
        want_clip = rho > 1 + eps_high if sign > 0 else rho < 1 - eps_low  # only against the advantage's direction
        assert torch.equal(clipped, want_clip), (sign, clipped)
        want = -torch.where(want_clip, rho.clamp(1 - eps_low, 1 + eps_high), rho) * adv
        assert torch.allclose(loss, want, atol=1e-6)
        lp = logp.clone().requires_grad_(True)  # the gradient vanishes exactly on clipped tokens
        grpo.clipped_surrogate(lp, old, adv, eps_low, eps_high)[0].sum().backward()
        assert torch.equal(lp.grad == 0, want_clip)


def test_aggregations_agree_when_lengths_are_equal():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    full = torch.ones(4, 6)
    values = [grpo.aggregate(x, full, m) for m in ("grpo", "bnpo", "dr_grpo")]
    assert torch.allclose(values[0], values[1]) and torch.allclose(values[0], values[2])
    assert torch.allclose(values[0], x.mean())
    ragged = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 6, [1] * 3 + [0] * 3])
    g, b, d = (grpo.aggregate(x, ragged, m) for m in ("grpo", "bnpo", "dr_grpo"))
    rows = [x[i, :int(ragged[i].sum())].mean() for i in range(4)]
    assert torch.allclose(g, torch.stack(rows).mean())
    assert torch.allclose(b, x[ragged.bool()].mean())
    assert torch.allclose(d, x[ragged.bool()].sum() / 24)
    assert not torch.allclose(g, b)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        grpo.aggregate(x, full, "mean")


def test_attribute_credit_gives_each_score_token_its_attributes_advantage():
    # one image, K = 3; per-attribute rewards chosen so every attribute's group advantage differs
    per_attr = torch.tensor([[[0.1, 0.9, 0.5, 0.2, 0.7], [0.4, 0.3, 0.5, 0.8, 0.1], [0.7, 0.6, 0.2, 0.5, 0.4]]])
    rewards = {"total": per_attr.sum(-1), "per_attribute": per_attr, "format": torch.tensor([[1.0, 0.0, 1.0]])}
    attr_tokens = torch.tensor([[-1, 0, -1, 1, 2, 3, 4], [4, 4, -1, -1, 0, -1, -1], [-1, -1, -1, -1, -1, -1, 2]])
    adv = reward.token_advantages(rewards, attr_tokens, credit="attribute", weights=[1.0] * 5)
    for k in range(3):
        for t in range(7):
            a = int(attr_tokens[k, t])
            if a >= 0:
                col = [float(per_attr[0, j, a]) for j in range(3)]
                mean = sum(col) / 3
                sd = math.sqrt(sum((c - mean) ** 2 for c in col) / 2)  # unbiased, as TRL
                want = (col[k] - mean) / (sd + 1e-4)
            else:
                want = [1.0, 0.0, 1.0][k] - 2 / 3  # the format advantage, unnormalised
            assert float(adv[k, t]) == pytest.approx(want, abs=1e-6), (k, t)
    seq = reward.token_advantages(rewards, attr_tokens, credit="sequence")
    assert torch.allclose(seq, reward.group_advantages(rewards["total"]).reshape(3, 1).expand(3, 7))
    # --weights scale each attribute's advantage; weight 0 leaves its score tokens none
    weights = [0.0] * (len(mgiqa.ATTRIBUTES) - 1) + [1.0]
    overall_only = reward.token_advantages(rewards, attr_tokens, credit="attribute", weights=weights)
    labelled = (attr_tokens >= 0) & (attr_tokens != mgiqa.ATTRIBUTES.index("overall"))
    assert labelled.any() and (overall_only[labelled] == 0).all()
    rest = ~labelled
    assert torch.equal(overall_only[rest], adv[rest])
    half = reward.token_advantages(rewards, attr_tokens, credit="attribute", weights=[0.5] * 5)
    assert torch.allclose(half[attr_tokens >= 0], 0.5 * adv[attr_tokens >= 0])


# ----------------------------------------------------------------------------- one step

@pytest.fixture(scope="module")
def lora_model(base):
    model = copy.deepcopy(base[0])
    lora.add_lora(model, rank=4, alpha=8)
    randomize_lora(model)  # so the reference (adapters off) differs: a live KL term
    return model, base[1]


def run_step(model, processor, cfg, images, lr=0.0, seed=0, ref=None, shared_prefix=True, **kw):
    """One grpo_step on a copy of the model with text_reward; returns the copy (with its gradients) and the figures."""
    m = copy.deepcopy(model)
    cfg = copy.deepcopy(cfg)
    cfg.grad_clip = 1e9
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=lr)
    policy = distributed.wrap(m, False, torch.float32, shared_prefix)
    tokens = grpo.Tokens.resolve(cfg, m, processor)
    torch.manual_seed(seed)
    stats = grpo.grpo_step(cfg, policy, processor, fake_batch(len(images)), encode(m, processor, images), opt, tokens,
                           ref=ref, reward_fn=text_reward, **kw)
    return m, stats


def marked_at_random(tokenizer, ids, mask):
    """Score-token marks for random text (the real rule finds none in it), so the entropy bonus is live."""
    g = torch.Generator().manual_seed(0)
    return torch.where(torch.rand(ids.shape, generator=g) < 0.4, torch.randint(0, 5, ids.shape, generator=g), -1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("entropy", [0.0, 0.3])
def test_micro_batches_give_the_full_batchs_gradient(lora_model, loss_type, entropy, monkeypatch):
    model, processor = lora_model
    model = copy.deepcopy(model)
    model.lm_head = EosBiased(model.lm_head, mgiqa.eos_ids(model, processor), bias=5.0)  # unequal lengths
    monkeypatch.setattr(reward, "score_token_attributes", marked_at_random)
    cfg = small_cfg(num_generations=2, max_new_tokens=8, loss_type=loss_type, entropy_coef=entropy, beta=0.04,
                    credit="attribute")
    images = random_images(3)
    full, s_full = run_step(model, processor, cfg, images)
    cfg.micro_batch = 1
    micro, s_micro = run_step(model, processor, cfg, images)
    assert s_full["completions"] == s_micro["completions"] and 1 < s_full["length"] < 8  # same rollouts, unequal lengths
    assert_close_grads(grads(micro), grads(full), rel=1e-5)
    for key in ("loss", "kl", "entropy"):
        assert s_micro[key] == pytest.approx(s_full[key], rel=1e-5, abs=1e-7), key
    assert s_full["kl"] > 0 and (entropy == 0) == (s_full["entropy"] == 0)


def test_second_iteration_clips_against_the_pre_update_policy(lora_model, monkeypatch):
    model, processor = lora_model
    seen, surrogate = [], grpo.clipped_surrogate

    def recording(logp, old_logp, advantages, eps_low, eps_high):
        out = surrogate(logp, old_logp, advantages, eps_low, eps_high)
        seen.append((logp.detach().clone(), old_logp.detach().clone(), advantages, out[1]))
        return out

    monkeypatch.setattr(grpo, "clipped_surrogate", recording)
    cfg = small_cfg(num_generations=2, max_new_tokens=8, num_iterations=2, epsilon=0.05, epsilon_high=0.05, beta=0.0)
    _, stats = run_step(model, processor, cfg, random_images(3), lr=5e-2, seed=1)
    (lp1, old1, a1, clip1), (lp2, old2, a2, clip2) = seen
    assert torch.equal(old1, old2)  # both iterations compare with the policy that sampled
    assert (lp1 - old1).abs().max() < 1e-5 and not clip1.any()  # first iteration: rho = 1
    rho = torch.exp(lp2 - old2)
    assert (rho - 1).abs().max() > 0.05  # the update moved the policy beyond the clip band
    want = torch.clamp(rho, 0.95, 1.05) * a2 < rho * a2
    assert torch.equal(clip2, want) and want.any()
    assert stats["clip"] == pytest.approx(float(want.float().mean()) / 2, rel=1e-6)  # per update: the mean of 0 and this


def test_shared_and_plain_steps_agree(lora_model):
    """The same seed: the same rollouts and rewards; the same loss, KL and gradients from both paths."""
    model, processor = lora_model
    cfg = small_cfg(num_generations=3, max_new_tokens=10, lr=0.0)
    out = {shared: run_step(model, processor, cfg, random_images(2), shared_prefix=shared) for shared in (True, False)}
    (a_model, a), (b_model, b) = out[True], out[False]
    assert a["completions"] == b["completions"]
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert a["kl"] > 0
    assert_close_grads(grads(a_model), grads(b_model))


def test_reference_with_adapters_disabled_equals_base(fresh):
    base_model, processor = fresh
    model = copy.deepcopy(base_model)
    wrapped = lora.add_lora(model, rank=4, alpha=8)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(lora.LM_TARGETS) and not any(".visual." in f".{n}" for n in wrapped)
    randomize_lora(model)
    from conftest import sample
    p, ids, mask = sample(base_model, processor, random_images(2), K=2, T=8)
    with torch.no_grad():
        lp = lambda m: rollouts.logprobs_shared(m, p, ids, mask, K=2)[0]  # noqa: E731
        base_lp, policy_lp = lp(base_model), lp(model)
        with lora.adapters_disabled(model):
            ref_lp = lp(model)
        again = lp(model)
    assert torch.equal(ref_lp, base_lp)
    assert (policy_lp - base_lp).abs().max() > 1e-2  # the adapters matter
    assert torch.equal(again, policy_lp)  # and are back on after the context


def test_one_step_changes_lora_weights_and_nothing_else():
    cfg = small_cfg()
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    assert ref is None
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr)
    policy, tokens = distributed.wrap(model, False, torch.float32), grpo.Tokens.resolve(cfg, model, processor)
    p = encode(model, processor, random_images(2))
    for i in range(2):  # lora_B starts at 0, so lora_A's gradient is 0 until B has moved
        torch.manual_seed(i)
        grpo.grpo_step(cfg, policy, processor, fake_batch(2), p, opt, tokens, reward_fn=text_reward)
    after = model.state_dict()
    for n in before:
        if ".lora_" in n:
            assert not torch.equal(before[n], after[n]), f"{n} did not change"
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed but is not a LoRA weight"


def test_full_step_changes_trainable_weights_not_the_reference():
    cfg = small_cfg(full=True, lr=1e-3)
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    assert ref is not None and not any(q.requires_grad for q in ref.parameters())
    assert all(q.requires_grad for q in model.parameters())
    before, ref_before = copy.deepcopy(model.state_dict()), copy.deepcopy(ref.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    torch.manual_seed(0)
    grpo.grpo_step(cfg, distributed.wrap(model, False, torch.float32), processor, fake_batch(2),
                   encode(model, processor, random_images(2)), opt, grpo.Tokens.resolve(cfg, model, processor),
                   ref=distributed.wrap(ref, False, torch.float32), reward_fn=text_reward)
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    unchanged = [n for n in params if torch.equal(before[n], after[n])]
    assert not unchanged, f"trainable weights that did not move: {unchanged}"
    assert any(".visual." in f".{n}" for n in params)
    for n, t in ref.state_dict().items():
        assert torch.equal(t, ref_before[n]), f"reference weight {n} changed"


def test_batch_meets_the_device():
    P, M = torch.zeros(5, 2, 2), torch.zeros(5, 2, 2, dtype=torch.bool)
    batch = grpo.to_device({"P": P, "M": M, "labels": torch.zeros(2, 5), "records": ["a", "b"], "dataset": "d"}, "meta")
    assert all(batch[k].device.type == "meta" for k in ("P", "M", "labels")) and batch["records"] == ["a", "b"]
    model, processor = mgiqa.load("tiny", device="cpu")
    p = encode(model, processor, [Image.new("RGB", (56, 56))])
    moved = rollouts.to_device(p, "meta")
    assert all(getattr(moved, f).device.type == "meta" for f in ("input_ids", "attention_mask", "positions", "pixel_values"))


# ----------------------------------------------------------------------------- configuration

def test_command_line_is_the_config():
    """Every Config field is a flag with its default and type; a switch has one name and one sense."""
    args = grpo.build_parser().parse_args(["--data", "x=y", "--no-thinking", "--no-shared-prefix", "-K", "4",
                                           "--weights", "1", "0", "0", "0", "1", "--lr", "3e-4"])
    cfg = grpo.config_from_args(args)
    assert cfg.thinking is False and cfg.shared_prefix is False and cfg.num_generations == 4 and cfg.lr == 3e-4
    assert cfg.weights == [1.0, 0.0, 0.0, 0.0, 1.0] and cfg.data == ["x=y"]
    default = grpo.config_from_args(grpo.build_parser().parse_args(["--data", "x=y"]))
    assert default.lr == 1e-5 and grpo.Config(full=True).lr == 1e-6  # LoRA ours; --full VisualQuality-R1
    assert (default.num_generations, default.beta, default.epsilon, default.max_new_tokens) == (6, 0.04, 0.2, 256)
    assert default.weights == list(reward.DEFAULT_WEIGHTS) and default.shared_prefix and default.thinking


# ----------------------------------------------------------------------------- the loop, checkpoints, resume

class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def synthetic():
    arrays, records = synth.synthesize(24, 56, seed=0)
    by_name = {r.image: a for r, a in zip(records, arrays)}
    return [r for r in records if r.split == "train"], lambda recs: [Image.fromarray(by_name[r.image]) for r in recs]


def run_train(out, synthetic, log=None, seed_noise=0):
    """A fresh process's worth of state: model, sampler and RNGs built anew (seed_noise scrambles
    what a resume must restore from the checkpoint)."""
    records, images_of = synthetic
    cfg = small_cfg(out=str(out), steps=6, save_every=3, keep=2, num_generations=2, max_new_tokens=6, lr=5e-3)
    torch.manual_seed(0)
    model, processor, ref = grpo.build_model(cfg)
    sampler = data.Sampler({"synthetic": records}, cfg.batch_size, seed=seed_noise)
    random.seed(seed_noise), np.random.seed(seed_noise), torch.manual_seed(100 + seed_noise)
    lines = []
    prompts_of = lambda recs: encode(model, processor, images_of(recs))  # noqa: E731
    history = grpo.train(cfg, model, processor, sampler, prompts_of=prompts_of, ref_model=ref, log=log or lines.append,
                         reward_fn=text_reward)
    return model, history, lines


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory):
    model, history, _ = run_train(tmp_path_factory.mktemp("straight"), synthetic)
    return grpo.trainable_state(model), history


def assert_same_run(model, history, uninterrupted):
    state, want_history = uninterrupted
    got = grpo.trainable_state(model)
    assert got.keys() == state.keys()
    assert any(t.abs().sum() > 0 for n, t in state.items() if ".lora_B" in n)  # it did learn something
    for n in state:
        assert torch.equal(got[n], state[n]), f"{n} differs from the uninterrupted run"
    assert [h["step"] for h in history] == [4, 5, 6]
    assert [h["reward"] for h in history] == [h["reward"] for h in want_history[3:]]


def test_resume_at_step_3_is_bit_identical(synthetic, uninterrupted, tmp_path):
    def crash_at_4(line):
        if line.startswith("step     4"):
            raise Crash(line)

    with pytest.raises(Crash):
        run_train(tmp_path, synthetic, log=crash_at_4)
    assert grpo.checkpoints(tmp_path) == [3]
    model, history, lines = run_train(tmp_path, synthetic, seed_noise=7)
    assert lines[0].startswith("resumed from") and lines[0].endswith("at step 3")
    assert_same_run(model, history, uninterrupted)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 6


def test_crash_during_checkpoint_write_resumes_from_previous(synthetic, uninterrupted, tmp_path, monkeypatch):
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
    assert grpo.checkpoints(tmp_path) == [3]
    model, history, lines = run_train(tmp_path, synthetic, seed_noise=3)
    assert "checkpoint-3 at step 3" in lines[0]
    assert_same_run(model, history, uninterrupted)
    assert grpo.checkpoints(tmp_path) == [3, 6] and not (tmp_path / "checkpoint-6.tmp").exists()


def test_evaluation_during_training_draws_from_every_dataset(tmp_path):
    for name in ("alpha", "beta"):
        synth.make_synthetic(str(tmp_path / name), 20, 56, seed=len(name), dataset=name)
    out = tmp_path / "run"
    code = grpo.main(["--data", f"manifest={tmp_path / 'alpha'}", f"manifest={tmp_path / 'beta'}", "--out", str(out),
                      "--steps", "2", "-B", "2", "-K", "2", "--max-new-tokens", "4", "--lora-rank", "4",
                      "--eval-every", "2", "--eval-limit", "6", "--save-every", "0"])
    assert code == 0
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert "eval" not in log[0] and set(log[1]["eval"]) == {"alpha", "beta"}
    assert sum(d["n"] for d in log[1]["eval"].values()) == 6
    assert {p.name for p in out.glob("split-*.csv")} == {"split-alpha.csv", "split-beta.csv"}
    assert not list(out.glob("*.tmp"))  # the split files were written atomically
    json.loads((out / "log.jsonl").read_text().splitlines()[1], parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))


# ----------------------------------------------------------------------------- precision, through grpo.main

def answer(rng) -> str:
    return "<answer>{" + ", ".join(f'"{a}": {rng.randint(1, 5)}' for a in mgiqa.ATTRIBUTES) + "}</answer>"


@pytest.fixture(scope="module")
def formatted(tmp_path_factory):
    """A tiny model that answers in the fast layout with random scores (200 supervised steps on
    random-digit answers, about 20 s): its rollouts parse, so the real reward has a gradient."""
    model, processor = mgiqa.load("tiny", device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(8)]
    p = encode(model, processor, images, thinking=False)
    tok, digits = processor.tokenizer, random.Random(0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        ids = torch.tensor([tok(answer(digits))["input_ids"] + [eos] for _ in images])  # (8, T): one token per digit
        hidden = rollouts.hidden_plain(model, p, ids, torch.ones_like(ids), K=1)
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("formatted")
    model.eval().save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    synth.make_synthetic(str(out / "data"), 30, 56, seed=0)
    return out


def train(formatted, out, *flags):
    """3 steps of grpo.main, a checkpoint after each; returns the weights after step 1 and step 3, and the log."""
    code = grpo.main(["--model", str(formatted / "model"), "--data", f"manifest={formatted / 'data'}", "--no-thinking",
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
    # with one iteration rho = 1, so the first loss is -mean advantage + beta * 0: ~0 in both
    assert log[0]["loss"] == pytest.approx(log32[0]["loss"], abs=1e-4)


def test_bf16_full_run_keeps_fp32_master_weights(formatted, tmp_path):
    first, last, _ = train(formatted, tmp_path / "full", "--full", "--dtype", "bfloat16", "--lr", "1e-6")
    assert all(t.dtype == torch.float32 for t in last.values())
    assert changed_fraction(first, last) > 0.99  # a bf16 weight would have kept ~98% of them (update < half an ulp)
    model, _ = mgiqa.load(str(tmp_path / "full" / "final"), device="cpu", dtype="float32")  # final/: the trained model
    params = dict(model.named_parameters())
    assert params.keys() == last.keys() and all(torch.equal(params[n], last[n]) for n in last)


def test_bf16_compute_logprobs_match_fp32(formatted):
    """The same completions scored by the bf16-base LoRA model (adapter matmuls in bf16 too) and by the
    fp32 one: within bf16 rounding; the adapters' weights stay fp32."""
    lps = []
    for dtype in (torch.float32, torch.bfloat16):
        model, processor = mgiqa.load(str(formatted / "model"), device="cpu", dtype=str(dtype).removeprefix("torch."))
        lora.add_lora(model, rank=4, alpha=8)
        randomize_lora(model, std=0.05)
        assert all(m.lora_A.dtype == torch.float32 for m in model.modules() if isinstance(m, lora.LoRALinear))
        images = [Image.fromarray(np.full((56, 56, 3), 120, dtype=np.uint8))] * 2
        p = encode(model, processor, images, thinking=False)
        ids = torch.tensor([processor.tokenizer(answer(random.Random(i)))["input_ids"] for i in range(4)])
        with torch.no_grad():
            lps.append(rollouts.logprobs_shared(model, p, ids, torch.ones_like(ids), K=2)[0])
    assert lps[1].dtype == torch.float32
    assert (lps[0] - lps[1]).abs().mean() < 0.05 and (lps[0] - lps[1]).abs().max() < 0.3

