"""The multi-dimensional Thurstone reward of MG-IQA, preferences, and GRPO group advantages.

Per attribute a (overall included), rollout k of image i is rewarded by how well the Thurstone
probability that its score beats image j's mean matches the ground-truth preference P[i, j]
(fidelity, as VisualQuality-R1's RL2R), averaged over the comparable images j; the total adds a
strict-format reward and weights the attributes (docs/METHOD.md, section 2). Preferences come from
labels (MOS, human attribute scores) or from distortion metadata of synthetic datasets (section 4).
The per-token credit GRPO gives those rewards (one advantage per completion, or per attribute score)
is here too.

    python reward.py --bench          # time mg_reward for B=64, K=8, A=5 on one CPU thread

Departures (NaN for unparseable scores, out-of-range scores in training, --ignore-ties, TRL
padding): docs/METHOD.md, section 7, departures 2 and 6.
"""
from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import time

import numpy as np
import torch

from mgiqa import ATTRIBUTES, FAMILY_TO_ATTRIBUTE, LABELLED, parse_answer

# (A,): overall 1, each attribute .25
DEFAULT_WEIGHTS = tuple(1.0 if a == "overall" else 0.25 for a in ATTRIBUTES)


def preference_matrix(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """P[i, j] = 1 / 0.5 / 0 as y[i] >, =, < y[j]; M False on the diagonal and for NaN labels."""
    y = torch.as_tensor(labels, dtype=torch.float64)                       # (B,)
    yi, yj = y[:, None], y[None, :]
    P = (yi > yj).float() + 0.5 * (yi == yj).float()                       # (B, B)
    labelled = ~torch.isnan(y)
    off_diagonal = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    M = labelled[:, None] & labelled[None, :] & off_diagonal
    return P, M


def preferences(records) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (B, A) with NaN where absent; ground truth P and mask M, both (A, B, B), ATTRIBUTES
    order. Labelled pairs: preference_matrix of each attribute's labels. Unlabelled pairs of one
    reference whose families map to the attribute (a clean image counts for every family) are
    ordered by level, the lower level better (mgiqa.FAMILY_TO_ATTRIBUTE: blur -> sharpness, noise,
    color, composition)."""
    labels = torch.tensor([[r.mos if a == "overall" else r.attributes.get(a, math.nan)
                            for a in ATTRIBUTES] for r in records], dtype=torch.float64)  # (B, A)
    pairs = [preference_matrix(labels[:, a]) for a in range(len(ATTRIBUTES))]
    P = torch.stack([p for p, _ in pairs])                                      # (A, B, B)
    M = torch.stack([m for _, m in pairs])                                      # (A, B, B)
    B = len(records)
    refs = [r.ref or "" for r in records]
    same_ref = torch.tensor([[bool(x) and x == y for y in refs] for x in refs])
    same_ref &= ~torch.eye(B, dtype=torch.bool)
    level = torch.tensor([math.nan if r.level is None else float(r.level) for r in records],
                         dtype=torch.float64)
    by_level, _ = preference_matrix(-level)                                     # lower is better
    clean = torch.tensor([r.clean for r in records])
    for name in LABELLED:
        a = ATTRIBUTES.index(name)
        ok = clean | torch.tensor([FAMILY_TO_ATTRIBUTE.get(r.family) == name and r.level is not None
                                   for r in records])
        meta = same_ref & ok[:, None] & ok[None, :] & ~M[a]                     # label pairs first
        P[a] = torch.where(meta, by_level, P[a])
        M[a] |= meta
    return labels.float(), torch.where(M, P, 0.5).float(), M


def group_stats(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image over its valid (non-NaN) rollouts: count n, mean mu, unbiased var (0 if n < 2)."""
    valid = ~torch.isnan(s)                                                # (..., B, K)
    n = valid.sum(-1)                                                      # (..., B)
    s0 = torch.where(valid, s, 0.0)
    mu = s0.sum(-1) / n.clamp(min=1)
    sq = torch.where(valid, s0 - mu[..., None], 0.0).pow(2).sum(-1)
    var = torch.where(n >= 2, sq / (n - 1).clamp(min=1), 0.0)
    return n, mu, var


def thurstone_probability(s, mu, var, gamma: float = 1e-6) -> torch.Tensor:
    """p_hat[i, j, k] = Phi((s[i, k] - mu[j]) / sqrt(var[i] + var[j] + gamma))."""
    s_ik = s[..., :, None, :]                # (..., B, 1, K): rollout k of image i
    mu_j = mu[..., None, :, None]            # (..., 1, B, 1): the other image's mean
    var_i = var[..., :, None, None]          # (..., B, 1, 1)
    var_j = var[..., None, :, None]          # (..., 1, B, 1)
    z = (s_ik - mu_j) / torch.sqrt(var_i + var_j + gamma)
    return torch.special.ndtr(z)             # (..., B, B, K)


def fidelity(P, p_hat, eps: float = 1e-6) -> torch.Tensor:
    """f = sqrt(P p_hat + eps) + sqrt((1 - P)(1 - p_hat) + eps), the fidelity loss's complement."""
    return torch.sqrt(P * p_hat + eps) + torch.sqrt((1 - P) * (1 - p_hat) + eps)


def thurstone_fidelity(scores, P, M, gamma: float = 1e-6, eps: float = 1e-6,
                       ignore_ties: bool = False) -> torch.Tensor:
    """r[i, k] = mean over comparable j of f[i, j, k]; 0 if no such j or s[i, k] is NaN.

    scores (..., B, K), P and M (..., B, B); leading dims (e.g. A) are batched alike.
    """
    n, mu, var = group_stats(scores)                                       # (..., B)
    f = fidelity(P.to(scores.dtype)[..., None], thurstone_probability(scores, mu, var, gamma), eps)
    B = scores.shape[-2]
    pair = M.bool() & (n > 0)[..., None, :] & ~torch.eye(B, dtype=torch.bool, device=scores.device)
    if ignore_ties:
        pair &= P != 0.5
    pair = pair[..., None] & ~torch.isnan(scores)[..., :, None, :]         # (..., B, B, K)
    total = torch.where(pair, f, 0.0).sum(-2)                              # (..., B, K)
    count = pair.sum(-2)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def format_reward(completions: list[str], thinking: bool = True) -> torch.Tensor:
    """1.0 where the completion is exactly the requested layout (strict parse), else 0.0."""
    return torch.tensor([float(parse_answer(c, strict=True, thinking=thinking) is not None)
                         for c in completions])


def parse_scores(completions: list[str], B: int, K: int) -> torch.Tensor:
    """Lenient scores, out-of-range = NaN (docs/METHOD.md, departure 2), as (B, K, A) in image-major
    row order."""
    if len(completions) != B * K:
        raise ValueError(f"reward.parse_scores: {len(completions)} completions, "
                         f"expected B*K = {B}*{K}")
    rows = [parse_answer(c, clip=False) for c in completions]
    scores = torch.tensor([[r[a] for a in ATTRIBUTES] for r in rows], dtype=torch.float32)
    return scores.view(B, K, len(ATTRIBUTES))


def mg_reward(completions: list[str], P, M, weights=None, w_format: float = 1.0,
              thinking: bool = True, gamma: float = 1e-6,
              ignore_ties: bool = False) -> dict[str, torch.Tensor]:
    """R[i, k] = w_format F[i, k] + sum_a w_a r[i, k, a]. P, M: (A, B, B), ATTRIBUTES order."""
    A = len(ATTRIBUTES)
    if P.dim() != 3 or P.shape[0] != A or P.shape[1] != P.shape[2] or M.shape != P.shape:
        raise ValueError(f"reward.mg_reward: P {tuple(P.shape)} and M {tuple(M.shape)} must both "
                         f"be (A={A}, B, B)")
    B = P.shape[1]
    if B == 0 or len(completions) == 0 or len(completions) % B:
        raise ValueError(f"reward.mg_reward: {len(completions)} completions do not split into "
                         f"B={B} images of K rollouts")
    K = len(completions) // B
    w = torch.as_tensor(DEFAULT_WEIGHTS if weights is None else weights, dtype=torch.float32,
                        device=P.device)
    if w.shape != (A,):
        raise ValueError(f"reward.mg_reward: weights {tuple(w.shape)} must be (A={A},) "
                         f"in order {ATTRIBUTES}")
    scores = parse_scores(completions, B, K).to(P.device)                  # (B, K, A)
    F = format_reward(completions, thinking).to(P.device).view(B, K)       # (B, K)
    r = thurstone_fidelity(scores.permute(2, 0, 1), P, M, gamma=gamma,
                           ignore_ties=ignore_ties)                       # (A, B, K)
    per_attribute = r.permute(1, 2, 0)                                     # (B, K, A)
    total = w_format * F + (per_attribute * w).sum(-1)
    return {"total": total, "per_attribute": per_attribute, "format": F, "scores": scores}


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A[i, k] = (R[i, k] - mean_k R) / (std_k R + eps), unbiased std as TRL; zeros when K = 1.
    A group whose K rewards are all equal gets exactly 0 (its float mean can sit one rounding step
    off the common value, which divided by std + eps would give about +-2e-3)."""
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(-1, keepdim=True)                      # (B, K)
    tied = (rewards == rewards[..., :1]).all(-1, keepdim=True)              # (B, 1)
    return torch.where(tied, 0.0, centred / (rewards.std(-1, keepdim=True) + eps))


# ----------------------------------------------------------------------------- per-token credit

_SCORE = re.compile(r'"?(' + "|".join(ATTRIBUTES) + r')"?\s*[:=]\s*"?([-+]?\d*\.?\d+)')


def score_token_attributes(tokenizer, ids, mask) -> torch.Tensor:
    """(R, T) index into ATTRIBUTES of the attribute whose score each token writes (in the last
    <answer> block), -1 elsewhere: which tokens `token_advantages(credit="attribute")` credits."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    decoded = {}  # token id -> its text: few distinct tokens (decode was 8% of a demo step)
    for r, (row, m) in enumerate(zip(ids.tolist(), mask.tolist())):
        for t in set(row) - decoded.keys():
            decoded[t] = tokenizer.decode([t])
        pieces = [decoded[t] if keep else "" for t, keep in zip(row, m)]
        ends = np.cumsum([len(s) for s in pieces])  # character offset where each token ends
        text = "".join(pieces)
        for match in _SCORE.finditer(text, max(text.rfind("<answer>"), 0)):
            lo, hi = match.span(2)
            first = int(np.searchsorted(ends, lo, side="right"))
            last = int(np.searchsorted(ends, hi - 1, side="right"))
            out[r, first:last + 1] = ATTRIBUTES.index(match.group(1))
    return out.to(ids.device)


def token_advantages(rewards: dict, attr_tokens, credit: str = "sequence",
                     weights=None) -> torch.Tensor:
    """(B*K, T) advantage per token. sequence: the group advantage of the total reward on every
    token (VisualQuality-R1). attribute: attribute a's score tokens take w_a times a's own group
    advantage (weight 0: no attribute advantage on them), every other token the unnormalised format
    advantage F - mean_k F (normalised by a tiny batch std, the few unparseable rollouts got
    advantages near -10 and the format collapsed). weights: (A,), default DEFAULT_WEIGHTS."""
    B, K = rewards["total"].shape
    T = attr_tokens.shape[1]
    if credit == "sequence":
        return group_advantages(rewards["total"]).reshape(B * K, 1).expand(B * K, T)
    if credit != "attribute":
        raise ValueError(f"unknown credit {credit!r} (sequence, attribute)")
    A = len(ATTRIBUTES)
    per_attribute = rewards["per_attribute"]                               # (B, K, A)
    w = torch.as_tensor(DEFAULT_WEIGHTS if weights is None else weights, dtype=per_attribute.dtype,
                        device=per_attribute.device)
    if w.shape != (A,):
        raise ValueError(f"reward.token_advantages: weights {tuple(w.shape)} must be (A={A},)")
    fmt = rewards["format"]                                                # (B, K)
    fmt_adv = (fmt - fmt.mean(1, keepdim=True)).reshape(B * K, 1).expand(B * K, T)
    attr_adv = group_advantages(per_attribute.transpose(1, 2)).transpose(1, 2) * w  # (B, K, A)
    attr_adv = attr_adv.reshape(B * K, 1, A).expand(B * K, T, A)
    own = attr_adv.gather(2, attr_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B*K, T)
    return torch.where(attr_tokens >= 0, own, fmt_adv)


def _text(completion) -> str:
    """A TRL completion: a string, or a conversation whose last message holds the text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"reward.trl_reward: completion of type {type(completion).__name__} is "
                    "neither str nor messages")


def _label(v) -> float:
    return math.nan if v is None else float(v)


def trl_reward(prompts, completions, image_id, *, weights=None, w_format: float = 1.0,
               thinking: bool = True, gamma: float = 1e-6, ignore_ties: bool = False,
               **columns) -> list[float]:
    """mg_reward behind TRL GRPOTrainer's reward-function signature; one float per completion.

    Groups rows by `image_id` (first-appearance order); labels come from columns named after the
    attributes (`mos` for overall also accepted); a missing column leaves that attribute
    unsupervised. Configure with functools.partial(trl_reward, thinking=False, ...).
    """
    if not completions or len(completions) != len(image_id):
        raise ValueError(f"reward.trl_reward: {len(completions)} completions but "
                         f"{len(image_id)} image_id values")
    order: dict = {}
    img = [order.setdefault(i, len(order)) for i in image_id]              # image of each row
    B = len(order)
    slot, seen, first = [], [0] * B, [0] * B  # rollout index; rows per image; its first row
    for row, b in enumerate(img):
        if seen[b] == 0:
            first[b] = row
        slot.append(seen[b])
        seen[b] += 1
    K = max(seen)
    texts = [""] * (B * K)                                    # "" parses to NaN: padding
    for row, (b, k) in enumerate(zip(img, slot)):
        texts[b * K + k] = _text(completions[row])
    idx = torch.tensor(img)
    Ps, Ms = [], []
    for a in ATTRIBUTES:
        col = columns.get(a, columns.get("mos") if a == "overall" else None)
        values = [math.nan] * len(img) if col is None else [_label(v) for v in col]
        rows = torch.tensor(values, dtype=torch.float64)
        y = rows[first]                                                    # (B,)
        if not ((rows == y[idx]) | (rows.isnan() & y[idx].isnan())).all():
            raise ValueError(f"reward.trl_reward: column '{a}' differs between rows of the same "
                             "image_id")
        P, M = preference_matrix(y)
        Ps.append(P)
        Ms.append(M)
    out = mg_reward(texts, torch.stack(Ps), torch.stack(Ms), weights=weights, w_format=w_format,
                    thinking=thinking, gamma=gamma, ignore_ties=ignore_ties)
    return out["total"][idx, torch.tensor(slot)].tolist()


def _random_completion(rng: random.Random) -> str:
    values = ", ".join(f'"{a}": {rng.uniform(0.5, 5.5):.2f}' for a in ATTRIBUTES)
    words = " ".join(rng.choice(["sharp", "noisy", "dull", "vivid"]) for _ in range(60))
    text = f"<think>{words}</think>\n<answer>{{{values}}}</answer>"
    return text if rng.random() > 0.1 else text[: rng.randrange(len(text))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the MG-IQA reward on one CPU thread.")
    parser.add_argument("--bench", action="store_true", help="time mg_reward on random completions")
    parser.add_argument("--B", type=int, default=64, help="images per batch")
    parser.add_argument("--K", type=int, default=8, help="rollouts per image")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the median is printed")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.error("nothing to do: pass --bench")
    torch.set_num_threads(1)
    rng = random.Random(0)
    completions = [_random_completion(rng) for _ in range(args.B * args.K)]
    pairs = [preference_matrix(torch.rand(args.B) * 4 + 1) for _ in ATTRIBUTES]
    P = torch.stack([p for p, _ in pairs])
    M = torch.stack([m for _, m in pairs])
    times = []
    for _ in range(args.repeats + 2):
        t0 = time.perf_counter()
        mg_reward(completions, P, M)
        times.append(time.perf_counter() - t0)
    median_ms = 1000 * statistics.median(times[2:])
    print(f"mg_reward B={args.B} K={args.K} A={len(ATTRIBUTES)}: median {median_ms:.1f} ms "
          f"over {args.repeats} runs (1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
