"""`python grpo.py --explain`: one real grpo_step, printed; its numbers are the step's own."""
import contextlib
import dataclasses
import io

import torch

import grpo
import mgiqa
import reward


def explain(cfg, record=True):
    lines = []
    out = grpo.explain_step(cfg, *grpo.explain_inputs(cfg), log=lines.append, record=record)
    return out, "\n".join(lines)


def test_explain_prints_the_steps_own_numbers_and_the_same_text_twice():
    cfg = grpo.explain_config([])
    shown, text = explain(cfg)
    assert explain(cfg)[1] == text  # deterministic: the same text run to run
    # the same seed through grpo_step with nothing recorded: the same loss and rewards
    plain = explain(cfg, record=False)[0]["figures"]
    assert plain["loss"] == shown["figures"]["loss"]  # one computation, recorded or not
    assert plain["reward"] == shown["figures"]["reward"]
    assert f"= {plain['loss']:+.6f}" in text
    rewards = shown["trace"]["mg_reward"][0][1]
    assert abs(float(rewards["total"].mean()) - plain["reward"]) < 1e-6
    for i, row in enumerate(rewards["total"]):
        group = reward.group_advantages(row[None])[0]
        assert f"image {i}: R {grpo._rows(row)}   A {grpo._rows(group)}" in text
    # the shipped warm-up answers in the format, and its K answers differ
    completions = shown["trace"]["mg_reward"][0][0][0]
    assert len(set(completions)) > 1 and float(rewards["format"].mean()) > 0.5
    # every section of the walk-through is there, in the order of docs/METHOD.md
    marks = ["[1]", "[3.1]", "[2.3, 2.4]", "[2.1]", "[2.7]", "[2.9]", "[3.4, 3.5]", "[3.6]"]
    assert [text.index(m) for m in marks] == sorted(text.index(m) for m in marks)


def test_explain_with_attribute_credit_puts_each_attributes_advantage_on_its_tokens():
    cfg = dataclasses.replace(grpo.explain_config([]), credit="attribute")
    shown, text = explain(cfg)
    (args, adv), = shown["trace"]["token_advantages"]
    attr = args[1]
    assert (attr >= 0).any()
    K = cfg.num_generations
    for row in (0, K):  # the rows the walk-through prints: each score token's attribute is marked
        for a in attr[row][attr[row] >= 0].unique().tolist():
            assert f"[{mgiqa.ATTRIBUTES[a][:4]}]" in text
    per_attribute = shown["trace"]["mg_reward"][0][1]["per_attribute"]  # (B, K, A)
    B, K, A = per_attribute.shape
    expected = reward.group_advantages(per_attribute.transpose(1, 2)).transpose(1, 2)
    expected = (expected * torch.tensor(cfg.weights)).reshape(B * K, A)
    rows, cols = (attr >= 0).nonzero(as_tuple=True)
    assert torch.allclose(adv[rows, cols], expected[rows, attr[rows, cols]], atol=1e-6)


def test_grpo_main_explain_takes_grpo_flags():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grpo.main(["--explain", "-K", "2", "--beta", "0"]) == 0
    text = out.getvalue()
    assert "B 2 images x K 2 rollouts" in text and "beta 0.0" in text
    assert "ref    (none)" in text  # beta 0: no reference log-probs
