"""step.py's update against its equations where test_grpo.py does not reach: per-attribute credit
by hand, micro-batches that add up to the full batch for every aggregation and with the entropy
bonus, num_iterations > 1 clipping against the pre-update policy, and the batched vision attention
against a per-sequence loop."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lora
import mgiqa
import parallel
import reward
import rollouts
import step
from test_grpo import assert_close_grads, cut_row, grads, random_images, randomize_lora, small_cfg, widen


def test_attribute_credit_gives_each_score_token_its_attributes_advantage():
    # one image, K = 3; per-attribute rewards chosen so every attribute's group advantage differs
    per_attr = torch.tensor([[[0.1, 0.9, 0.5, 0.2, 0.7], [0.4, 0.3, 0.5, 0.8, 0.1], [0.7, 0.6, 0.2, 0.5, 0.4]]])
    rewards = {"total": per_attr.sum(-1), "per_attribute": per_attr, "format": torch.tensor([[1.0, 0.0, 1.0]])}
    attr_tokens = torch.tensor([[-1, 0, -1, 1, 2, 3, 4], [4, 4, -1, -1, 0, -1, -1], [-1, -1, -1, -1, -1, -1, 2]])
    adv = reward.token_advantages(rewards, attr_tokens, credit="attribute")
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


@pytest.fixture(scope="module")
def lora_model():
    model, processor = mgiqa.tiny_vlm(0, "tiny")
    widen(model)
    lora.add_lora(model, rank=4, alpha=8)
    randomize_lora(model)  # so the reference (adapters off) differs: a live KL term
    return model, processor


def fixed_rollouts(model, processor, B=3, K=2, T=8, seed=0):
    """Rollouts whose rows end at different lengths (so micro-batches hold unequal token counts),
    random advantages, and some tokens marked as score tokens (for the entropy bonus)."""
    images = random_images(B, seed)
    p = rollouts.encode_prompts(model, processor, images)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (B * K, T), generator=g)
    eos, pad = mgiqa.eos_ids(model, processor)[0], processor.tokenizer.pad_token_id
    for row, at in ((0, 1), (2, 3), (3, 6)):
        ids = cut_row(ids, row, at, eos, pad)
    mask = rollouts.completion_mask(ids, [eos])
    adv = torch.randn(B * K, T, generator=g)
    attr_tokens = torch.where(torch.rand(B * K, T, generator=g) < 0.4, torch.randint(0, 5, (B * K, T), generator=g), -1)
    return step.Rollouts(p, ids, mask, [""] * (B * K)), adv, attr_tokens


def run_update(model, processor, cfg, roll, adv, attr_tokens, lr=0.0):
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=lr)
    stats = step.update({**cfg, "grad_clip": 1e9}, parallel.Policy(m), processor, roll, adv, attr_tokens, optimizer=opt)
    return m, stats


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("entropy", [0.0, 0.3])
def test_micro_batches_give_the_full_batchs_gradient(lora_model, loss_type, entropy):
    model, processor = lora_model
    roll, adv, attr_tokens = fixed_rollouts(model, processor)
    assert len(set(roll.mask.sum(1).tolist())) > 1
    cfg = small_cfg(num_generations=2, max_new_tokens=8, loss_type=loss_type, entropy_coef=entropy, beta=0.04)
    full, s_full = run_update(model, processor, {**cfg, "micro_batch": 0}, roll, adv, attr_tokens)
    micro, s_micro = run_update(model, processor, {**cfg, "micro_batch": 1}, roll, adv, attr_tokens)
    assert_close_grads(grads(micro), grads(full), rel=1e-5)
    for key in ("loss", "kl", "entropy"):
        assert s_micro[key] == pytest.approx(s_full[key], rel=1e-5, abs=1e-7), key
    assert s_full["kl"] > 0 and (entropy == 0) == (s_full["entropy"] == 0)


def test_second_iteration_clips_against_the_pre_update_policy(lora_model, monkeypatch):
    model, processor = lora_model
    roll, adv, attr_tokens = fixed_rollouts(model, processor, seed=1)
    seen, surrogate = [], step.clipped_surrogate

    def recording(logp, old_logp, advantages, eps_low, eps_high):
        out = surrogate(logp, old_logp, advantages, eps_low, eps_high)
        seen.append((logp.detach().clone(), old_logp.detach().clone(), advantages, out[1]))
        return out

    monkeypatch.setattr(step, "clipped_surrogate", recording)
    cfg = small_cfg(num_generations=2, max_new_tokens=8, num_iterations=2, epsilon=0.05, epsilon_high=0.05, beta=0.0)
    _, stats = run_update(model, processor, cfg, roll, adv, attr_tokens, lr=5e-2)
    (lp1, old1, a1, clip1), (lp2, old2, a2, clip2) = seen
    assert torch.equal(old1, old2)  # both iterations compare with the policy that sampled
    assert (lp1 - old1).abs().max() < 1e-5 and not clip1.any()  # first iteration: rho = 1
    rho = torch.exp(lp2 - old2)
    assert (rho - 1).abs().max() > 0.05  # the update moved the policy beyond the clip band
    want = torch.clamp(rho, 0.95, 1.05) * a2 < rho * a2
    assert torch.equal(clip2, want) and want.any()
    m = roll.mask.float()
    assert stats["clip"] == pytest.approx(float((want.float() * m).sum() / m.sum()), rel=1e-6)


def test_batched_vision_attention_equals_one_sequence_at_a_time():
    torch.manual_seed(0)
    H, d, lengths = 2, 8, [5, 3, 5, 2, 3, 64]
    q, k, v = (torch.randn(1, H, sum(lengths), d) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got, _ = rollouts._varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)
    want = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]).transpose(1, 2)
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-6
