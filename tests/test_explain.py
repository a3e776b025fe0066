"""`python demo.py --explain`: one real grpo_step, printed; its numbers are the step's own."""
import copy
import dataclasses

import pytest
import torch

import demo
import grpo
import mgiqa
import reward


def explain_config(**changes) -> grpo.Config:
    return dataclasses.replace(demo.explain_config([]), **changes)


@pytest.fixture(scope="module")
def warmed():
    """The explain model after 100 answer-layout steps (16 of 16 greedy answers strict, measured)."""
    return demo.explain_model(seed=0, format_steps=100)


def explain(cfg, warmed, record=True):
    model, processor, scenes = warmed
    lines = []
    out = demo.explain(copy.deepcopy(model), processor, scenes, cfg, log=lines.append,
                       record=record)
    return out, "\n".join(lines)


def test_explain_prints_the_steps_own_numbers_and_the_same_text_twice(warmed):
    cfg = explain_config()
    shown, text = explain(cfg, warmed)
    assert explain(cfg, warmed)[1] == text  # deterministic: the same text run to run
    # the same seed through grpo_step with nothing recorded: the same loss and rewards
    plain = explain(cfg, warmed, record=False)[0]["figures"]
    assert plain["loss"] == shown["figures"]["loss"]  # one computation, recorded or not
    assert plain["reward"] == shown["figures"]["reward"]
    assert f"= {plain['loss']:+.6f}" in text
    rewards = shown["trace"]["mg_reward"][0][1]
    assert abs(float(rewards["total"].mean()) - plain["reward"]) < 1e-6
    for i, row in enumerate(rewards["total"]):
        group = reward.group_advantages(row[None])[0]
        assert f"image {i}: R {grpo._rows(row)}   A {grpo._rows(group)}" in text
    # the K answers differ, so the rewards and advantages are not all equal
    completions = shown["trace"]["mg_reward"][0][0][0]
    assert len(set(completions)) > 1
    # every section of the walk-through is there, in the order of docs/METHOD.md
    marks = ["[1]", "[3.1]", "[2.3, 2.4]", "[2.1]", "[2.7]", "[2.9]", "[3.4, 3.5]", "[3.6]"]
    assert [text.index(m) for m in marks] == sorted(text.index(m) for m in marks)


def test_explain_with_attribute_credit_puts_each_attributes_advantage_on_its_tokens(warmed):
    cfg = explain_config(credit="attribute")
    shown, text = explain(cfg, warmed)
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
