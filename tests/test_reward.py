"""reward.py against docs/METHOD.md, section 2: a loop reference, hand-computed cases, invariances, robustness."""
import math
import random
import statistics

import pytest
import torch

from mgiqa import ATTRIBUTES
from reward import (DEFAULT_WEIGHTS, format_reward, group_advantages,
                    mg_reward, preference_matrix, thurstone_fidelity, trl_reward)

EPS = 1e-6
NAN = math.nan


def loop_fidelity(s, y, gamma=1e-6, eps=EPS, ignore_ties=False):
    """The reward of docs/METHOD.md section 2 written with loops, from labels y (NaN = unlabelled); s a list of B lists of K floats."""
    B = len(s)
    valid = [[x for x in row if not math.isnan(x)] for row in s]
    mu = [sum(v) / len(v) if v else 0.0 for v in valid]
    var = [statistics.variance(v) if len(v) >= 2 else 0.0 for v in valid]
    out = []
    for i in range(B):
        row = []
        for x in s[i]:
            terms = []
            for j in range(B):
                if j == i or math.isnan(x) or math.isnan(y[i]) or math.isnan(y[j]) or not valid[j]:
                    continue
                p = 1.0 if y[i] > y[j] else 0.5 if y[i] == y[j] else 0.0
                if ignore_ties and p == 0.5:
                    continue
                z = (x - mu[j]) / math.sqrt(var[i] + var[j] + gamma)
                ph = 0.5 * (1 + math.erf(z / math.sqrt(2)))
                terms.append(math.sqrt(p * ph + eps) + math.sqrt((1 - p) * (1 - ph) + eps))
            row.append(sum(terms) / len(terms) if terms else 0.0)
        out.append(row)
    return out


def random_batch(rng, B, K):
    """Scores with NaN, identical rollouts, all-NaN images; labels with ties and NaN."""
    s = []
    for _ in range(B):
        kind = rng.random()
        if kind < 0.15:
            s.append([rng.choice([1.0, 3.0, 5.0])] * K)                   # identical rollouts
        elif kind < 0.25:
            s.append([NAN] * K)                                            # no valid rollout
        else:
            s.append([NAN if rng.random() < 0.2 else round(rng.uniform(1, 5), 2) for _ in range(K)])
    y = [NAN if rng.random() < 0.15 else float(rng.randint(1, 4)) for _ in range(B)]  # ties likely
    return s, y


def answer(values, think=True):
    body = ", ".join(f'"{a}": {v:.2f}' for a, v in zip(ATTRIBUTES, values) if not math.isnan(v))
    return ("<think>looks fine</think>\n" if think else "") + f"<answer>{{{body}}}</answer>"


def expected_score(v):
    return NAN if math.isnan(v) or not 1 <= round(v, 2) <= 5 else round(v, 2)


@pytest.mark.parametrize("ignore_ties", [False, True])
def test_matches_loop_reference(ignore_ties):
    rng = random.Random(1)
    for _ in range(120):
        B, K = rng.randint(1, 7), rng.randint(1, 5)
        s, y = random_batch(rng, B, K)
        P, M = preference_matrix(y)
        got = thurstone_fidelity(torch.tensor(s, dtype=torch.float64), P, M, ignore_ties=ignore_ties)
        assert torch.equal(thurstone_fidelity(torch.tensor(s, dtype=torch.float64), P, M | torch.eye(B, dtype=torch.bool),
                                              ignore_ties=ignore_ties), got)                  # i is never compared to itself
        assert torch.allclose(got, torch.tensor(loop_fidelity(s, y, ignore_ties=ignore_ties), dtype=torch.float64),
                              atol=1e-6, rtol=0)


def test_mg_reward_matches_loop_reference():
    rng = random.Random(2)
    for _ in range(20):
        B, K = rng.randint(2, 5), rng.randint(2, 4)
        raw = [[[NAN if rng.random() < 0.1 else rng.uniform(0.5, 5.5) for _ in ATTRIBUTES] for _ in range(K)] for _ in range(B)]
        labels = [random_batch(rng, B, 1)[1] for _ in ATTRIBUTES]
        P, M = map(torch.stack, zip(*(preference_matrix(y) for y in labels)))
        weights = [rng.random() for _ in ATTRIBUTES]
        out = mg_reward([answer(v) for row in raw for v in row], P, M, weights=weights, w_format=0.7)
        for a in range(len(ATTRIBUTES)):
            s = [[expected_score(v[a]) for v in row] for row in raw]
            assert torch.allclose(out["per_attribute"][..., a].double(), torch.tensor(loop_fidelity(s, labels[a]), dtype=torch.float64), atol=1e-5)
        F = torch.tensor([[float(all(not math.isnan(expected_score(x)) for x in v)) for v in row] for row in raw])
        assert torch.equal(out["format"], F)
        assert torch.allclose(out["total"], 0.7 * F + (out["per_attribute"] * torch.tensor(weights)).sum(-1))


def test_hand_computed_values():
    # p = 1, p_hat = 1 (s=5 vs mu=1, sd sqrt(gamma)): sqrt(1 + eps) + sqrt(eps); mirrored for p = 0, p_hat = 0
    r = thurstone_fidelity(torch.tensor([[5.0], [1.0]], dtype=torch.float64), *preference_matrix([2.0, 1.0]))
    # tolerance: the two sides come from different kernels (torch's sqrt/erf against math's), which
    # round differently on other CPUs; float64 leaves 1e-12 ample room
    assert torch.allclose(r, torch.full((2, 1), math.sqrt(1 + EPS) + math.sqrt(EPS), dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(r[0, 0].item() - 1.0010005) < 1e-9
    # a tie at p_hat = 0.5: 2 sqrt(0.25 + eps)
    r = thurstone_fidelity(torch.tensor([[3.0], [3.0]], dtype=torch.float64), *preference_matrix([2.0, 2.0]))
    assert r[0, 0].item() == pytest.approx(2 * math.sqrt(0.25 + EPS), abs=1e-12)
    # mu0 = 3.5, var0 = 0.5, mu1 = 2, var1 = 0; rollout 3.0 of the better image vs image 1
    r = thurstone_fidelity(torch.tensor([[3.0, 4.0], [2.0, 2.0]], dtype=torch.float64), *preference_matrix([5.0, 1.0]))
    ph = 0.5 * (1 + math.erf(1 / math.sqrt(0.5 + 1e-6) / math.sqrt(2)))
    assert r[0, 0].item() == pytest.approx(math.sqrt(ph + EPS) + math.sqrt(EPS), abs=1e-12)


def test_best_image_above_every_mean_scores_near_one():
    s = torch.tensor([[4.5, 4.6, 4.4, 4.5], [3.0, 3.2, 2.9, 3.1], [2.0, 2.1, 1.8, 2.2], [1.1, 1.3, 1.0, 1.2]])
    r = thurstone_fidelity(s, *preference_matrix([4.0, 3.0, 2.0, 1.0]))
    assert ((r[0] - 1).abs() < 2e-3).all()


def test_agreeing_rollout_beats_contradicting_one():
    s = torch.tensor([[4.0, 4.2, 3.8, 4.0], [3.0, 4.5, 1.5, 3.0], [2.0, 2.2, 1.8, 2.0]])
    r = thurstone_fidelity(s, *preference_matrix([3.0, 2.0, 1.0]))
    assert r[1, 0] > r[1, 1] and r[1, 0] > r[1, 2]
    # and through the text path, on every attribute at once
    P, M = map(torch.stack, zip(*[preference_matrix([3.0, 2.0, 1.0])] * len(ATTRIBUTES)))
    out = mg_reward([answer([x] * len(ATTRIBUTES)) for x in s.flatten().tolist()], P, M)
    assert out["total"][1, 0] > out["total"][1, 1] and out["total"][1, 0] > out["total"][1, 2]


def test_permuting_images_permutes_rewards():
    rng = random.Random(3)
    s, y = random_batch(rng, 6, 4)
    s, y = torch.tensor(s), torch.tensor(y)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    r = thurstone_fidelity(s, *preference_matrix(y))
    assert torch.allclose(thurstone_fidelity(s[perm], *preference_matrix(y[perm])), r[perm])


def test_equal_rewards_give_zero_advantage():
    R = torch.tensor([[0.7, 0.7, 0.7], [0.1, 0.5, 0.9]])
    A = group_advantages(R)
    assert torch.equal(A[0], torch.zeros(3))
    sd = statistics.stdev([0.1, 0.5, 0.9])
    assert torch.allclose(A[1], torch.tensor([(x - 0.5) / (sd + 1e-4) for x in (0.1, 0.5, 0.9)]))
    assert torch.equal(group_advantages(torch.ones(4, 1)), torch.zeros(4, 1))
    # a float32 mean of 8 copies of 0.7 is one rounding step off 0.7: still exactly 0
    tied = torch.full((2, 8), 0.7)
    assert (tied - tied.mean(-1, keepdim=True)).abs().max() > 0  # the case the rule is for
    assert torch.equal(group_advantages(tied), torch.zeros(2, 8))
    # identical completions of one image get identical totals, hence zero advantage
    P, M = map(torch.stack, zip(*[preference_matrix([3.0, 1.0])] * len(ATTRIBUTES)))
    out = mg_reward([answer([4.0] * 5)] * 3 + [answer([2.0] * 5), answer([1.5] * 5), "junk"], P, M)
    assert torch.equal(group_advantages(out["total"])[0], torch.zeros(3))


def test_no_nan_or_inf_on_10000_degenerate_batches():
    g = torch.Generator().manual_seed(4)
    n = 0
    for B, K in [(1, 1), (1, 4), (2, 1), (3, 3), (4, 8)]:
        N = 2000
        s = torch.randint(0, 3, (N, B, K), generator=g).double() * 2 + 1          # 1, 3, 5: many identical
        s = torch.where(torch.rand(N, B, 1, generator=g) < 0.3, s[..., :1].expand(N, B, K), s)  # identical rollouts
        s[torch.rand(N, B, K, generator=g) < torch.rand(N, 1, 1, generator=g)] = NAN
        y = torch.randint(0, 3, (N, B), generator=g).double()
        y[torch.rand(N, B, generator=g) < 0.2] = NAN
        P = (y[..., :, None] > y[..., None, :]).double() + 0.5 * (y[..., :, None] == y[..., None, :]).double()
        M = (torch.rand(N, B, B, generator=g) < 0.7) & ~(y.isnan()[..., :, None] | y.isnan()[..., None, :])
        for ties in (False, True):
            r = thurstone_fidelity(s, P, M, ignore_ties=ties)
            assert r.shape == (N, B, K) and torch.isfinite(r).all() and (r >= 0).all() and (r <= 1.5).all()
            assert torch.isfinite(group_advantages(r.reshape(N * B, K))).all()
        n += N
    assert n == 10_000


def test_preference_matrix_by_hand():
    P, M = preference_matrix([3.0, 1.0, 3.0, NAN])
    assert P[:3, :3].tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    assert M.tolist() == [[False, True, True, False], [True, False, True, False],
                          [True, True, False, False], [False, False, False, False]]


def make_trl_batch(rng, B=4, K=3):
    raw = [[[rng.uniform(1, 5) for _ in ATTRIBUTES] for _ in range(K)] for _ in range(B)]
    completions = [answer(v) for row in raw for v in row]
    completions[1] = "no answer at all"
    mos = [float(rng.randint(1, 3)) for _ in range(B)]
    sharp = [rng.uniform(1, 5) for _ in range(B)]
    sharp[2] = None
    return completions, mos, sharp


def test_trl_reward_equals_mg_reward():
    rng = random.Random(5)
    B, K = 4, 3
    completions, mos, sharp = make_trl_batch(rng, B, K)
    P, M = torch.zeros(len(ATTRIBUTES), B, B), torch.zeros(len(ATTRIBUTES), B, B, dtype=torch.bool)
    for name, y in (("overall", mos), ("sharpness", sharp)):
        a = ATTRIBUTES.index(name)
        P[a], M[a] = preference_matrix([NAN if v is None else v for v in y])
    expected = mg_reward(completions, P, M)["total"].flatten()
    ids = [f"img{i // K}" for i in range(B * K)]
    rows = list(range(B * K))
    rng.shuffle(rows)
    for order in (list(range(B * K)), rows):
        got = trl_reward(prompts=[None] * (B * K), completions=[[{"role": "assistant", "content": completions[r]}] for r in order],
                         image_id=[ids[r] for r in order], mos=[mos[r // K] for r in order],
                         sharpness=[sharp[r // K] for r in order], completion_ids=None)
        assert torch.allclose(torch.tensor(got), expected[order])
    # an uneven group (TRL can split one across processes) is padded with NaN-scoring rows
    keep = [r for r in range(B * K) if r != 5]
    got = trl_reward(None, [completions[r] for r in keep], [ids[r] for r in keep], overall=[mos[r // K] for r in keep],
                     sharpness=[sharp[r // K] for r in keep])
    padded = [c if r != 5 else "" for r, c in enumerate(completions)]
    assert torch.allclose(torch.tensor(got), mg_reward(padded, P, M)["total"].flatten()[keep])
    with pytest.raises(ValueError, match="differs"):
        trl_reward(None, completions, ids, mos=[float(r) for r in range(B * K)])


def test_ignore_ties_drops_ties():
    s = torch.tensor([[3.0, 3.5], [2.5, 3.0], [1.0, 1.5]])
    P, M = preference_matrix([2.0, 2.0, 1.0])
    no_tie = M.clone()
    no_tie[0, 1] = no_tie[1, 0] = False
    assert torch.equal(thurstone_fidelity(s, P, M, ignore_ties=True), thurstone_fidelity(s, P, no_tie))
    assert not torch.equal(thurstone_fidelity(s, P, M), thurstone_fidelity(s, P, no_tie))
    assert not thurstone_fidelity(s, *preference_matrix([1.0, 1.0, 1.0]), ignore_ties=True).any()


def test_format_weights_and_errors():
    good = answer([4.0, 3.0, 2.0, 1.5, 3.5])
    assert format_reward([good, good.replace("<think>looks fine</think>\n", ""), "junk", answer([4.0, 3.0, 2.0, 6.0, 3.5])]).tolist() == [1, 0, 0, 0]
    assert format_reward([answer([4.0] * 5, think=False)], thinking=False).tolist() == [1.0]
    assert DEFAULT_WEIGHTS == (0.25, 0.25, 0.25, 0.25, 1.0)
    P, M = map(torch.stack, zip(*[preference_matrix([2.0, 1.0])] * len(ATTRIBUTES)))
    out = mg_reward([good] * 3, P[:, :1, :1], M[:, :1, :1])
    assert out["total"].shape == (1, 3) and out["scores"].shape == (1, 3, len(ATTRIBUTES))
    with pytest.raises(ValueError, match="do not split"):
        mg_reward([good] * 3, P, M)
    with pytest.raises(ValueError, match="must both be"):
        mg_reward([good] * 4, P[0], M[0])


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2.5-vl"])
def test_score_token_attributes_marks_each_scores_digits(name):
    """Against a naive reference that decodes every prefix of the row: a token belongs to attribute
    a when the text it adds lies inside a's number after the last <answer> (anywhere if none); with
    the in-process tokenizer and with Qwen's, which writes every digit and the point as their own
    tokens (integer, one- and two-decimal scores)."""
    import re

    import mgiqa
    import tiny
    from reward import score_token_attributes

    if name == "tiny":
        tok = mgiqa.load("tiny", device="cpu")[1].tokenizer
    else:
        tok = tiny.real_processor(name).tokenizer
    texts = ['<think>dull</think><answer>{"sharpness": 4, "color": 2, "noise": 5, "composition": 3.5, "overall": 12}</answer><|im_end|>',
             '<answer>{"noise": 1}</answer> <answer>{"overall": 3, "sharpness": 4.25}</answer><|im_end|>',  # only the last answer counts
             'no tags: "overall": 3<|im_end|>',
             '<answer>{"colour": 3, "color": 2}</answer><|im_end|>',
             '<answer>{"sharpness": 4.10, "color": 3.8, "noise": 4.50, "composition": 3.20, "overall": 3.90}</answer><|im_end|>']
    rows = [tok(t).input_ids for t in texts]
    Tc = max(map(len, rows)) + 2
    ids = torch.tensor([r + [tok.pad_token_id] * (Tc - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (Tc - len(r)) for r in rows])
    got = score_token_attributes(tok, ids, mask)
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
    if name != "tiny":  # one token per digit and per point: "4.10" is 4 tokens, all of them sharpness's
        assert got[4].tolist().count(0) == 4 and got[4].tolist().count(1) == 3
