"""The policy side of grpo.py: prompts encoded once, K sampled completions per image, and the
per-token log-probs of those completions under the model (docs/METHOD.md, section 3: logits / temperature,
log-softmax, gather; the completion mask runs up to and including the first EOS).

Shared prompt (grpo.py's departure 2): the vision tower and the prompt prefill run once per image
and the KV cache is expanded K times, in sampling and in the training forward alike; the
straightforward layout (`shared_prefix=False`: every prompt repeated K times) gives the same numbers
and is kept as the reference the tests compare against. Special tokens (`banned`) are masked out of
sampling and of the log-softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import mgiqa


# ----------------------------------------------------------------------------- prompts and the model's forward

@dataclass
class Prompts:
    """B encoded prompts, one image each, left padded."""
    input_ids: torch.Tensor       # (B, Tp)
    attention_mask: torch.Tensor  # (B, Tp)
    positions: torch.Tensor       # (3, B, Tp) multimodal rope positions, as the model computes them
    next_position: torch.Tensor   # (B,) the position of the first completion token
    pixel_values: torch.Tensor    # (sum of patches, C)
    image_grid_thw: torch.Tensor  # (B, 3)
    shared: int = 0               # leading tokens identical in every row (the instruction): prefilled once
    features: tuple | None = None  # per image, the vision tower's output computed beforehand (a frozen
                                   # tower, e.g. the demo's): used instead of running the tower on the pixels


def encode_prompts(model, processor, images, thinking=True) -> Prompts:
    device = next(model.parameters()).device
    text = mgiqa.prompt_text(processor, thinking)
    enc = processor(text=[text] * len(images), images=[mgiqa.load_image(im) for im in images],
                    padding=True, return_tensors="pt").to(device)
    ids, attn, types, shared = _pad_after_shared_text(enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"])
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=enc["image_grid_thw"],
                                              attention_mask=attn)
    return Prompts(ids, attn, positions, positions.amax(dim=(0, 2)) + 1, enc["pixel_values"], enc["image_grid_thw"], shared)


def _pad_after_shared_text(ids, attn, types):
    """Move each row's left padding to just after the text all rows share (the instruction comes
    before the image), so that text is one identical prefix: computed once, not once per row.
    The attention mask and rope positions skip padding wherever it sits, so the numbers are the same."""
    rows = [r[m.bool()] for r, m in zip(ids, attn)]
    kinds = [t[m.bool()] for t, m in zip(types, attn)]
    n = min(len(r) for r in rows)
    same = torch.stack([r[:n] == rows[0][:n] for r in rows]).all(0) & (kinds[0][:n] == 0)
    shared = int(n if bool(same.all()) else same.long().argmin())
    shared = min(shared, n - 1)  # keep at least one token per row after the prefix
    T = ids.shape[1]
    new_ids, new_attn, new_types = torch.zeros_like(ids), torch.zeros_like(attn), torch.zeros_like(types)
    for b, (r, k) in enumerate(zip(rows, kinds)):
        pad = T - len(r)
        new_ids[b] = torch.cat([r[:shared], ids[b, :pad], r[shared:]])  # pad ids kept as they were
        new_attn[b] = torch.cat([torch.ones(shared, dtype=attn.dtype), torch.zeros(pad, dtype=attn.dtype),
                                 torch.ones(len(r) - shared, dtype=attn.dtype)])
        new_types[b] = torch.cat([k[:shared], types[b, :pad], k[shared:]])
    return new_ids, new_attn, new_types, shared


def repeat_prompts(p: Prompts, K: int) -> Prompts:
    """The straightforward layout: every prompt (and its image's pixel rows) repeated K times."""
    patches = p.image_grid_thw.prod(-1).tolist()
    blocks = torch.split(p.pixel_values, patches)
    pixels = torch.cat([b for b in blocks for _ in range(K)])
    features = None if p.features is None else tuple(f for f in p.features for _ in range(K))
    return Prompts(p.input_ids.repeat_interleave(K, 0), p.attention_mask.repeat_interleave(K, 0),
                   p.positions.repeat_interleave(K, 1), p.next_position.repeat_interleave(K, 0),
                   pixels, p.image_grid_thw.repeat_interleave(K, 0), p.shared, features)


def select(p: Prompts, idx: list[int]) -> Prompts:
    """The prompts of some images (idx), with their pixel rows."""
    blocks = torch.split(p.pixel_values, p.image_grid_thw.prod(-1).tolist())
    return Prompts(p.input_ids[idx], p.attention_mask[idx], p.positions[:, idx], p.next_position[idx],
                   torch.cat([blocks[i] for i in idx]), p.image_grid_thw[idx], p.shared,
                   None if p.features is None else tuple(p.features[i] for i in idx))


def image_features(model, p: Prompts):
    """One vision-tower pass; returns the encoder output whose pooler_output holds one block per image."""
    if p.features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=p.features)
    return model.model.get_image_features(p.pixel_values, p.image_grid_thw, return_dict=True)


def expand_features(features, K: int):
    """Each image's features referenced K times (gradients from all K rows add up in the tower)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tuple(f for f in features.pooler_output for _ in range(K)))


def _prefix_cache_breaks_backward(model) -> bool:
    """A prompt KV cache shared by the completion rows cannot carry gradients when HF's gradient
    checkpointing is on (it drops the cache inside checkpointed layers while grad is on,
    transformers/modeling_layers.py) or the layers are FSDP2 units (the completion pass's backward
    reshards a layer before the prompt pass's backward has used its weights)."""
    from torch.distributed.fsdp import FSDPModule

    return any(getattr(m, "gradient_checkpointing", False) or isinstance(m, FSDPModule)
               for m in model.model.language_model.modules())


def _varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """Vision attention over many images in one call: (1, H, S, d) split by cu_seq_lens into
    independent sequences; the sequences of each length go through one batched sdpa (memory
    sum L^2, never one S x S mask). transformers' own non-flash path loops over them one by one."""
    _, H, S, d = query.shape
    starts, lengths = cu_seq_lens_q[:-1].tolist(), (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    if len(set(lengths)) == 1:  # same-size images: one view, no copies
        n, L = len(lengths), lengths[0]
        q, k, v = (t.view(H, n, L, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, d)
        return F.scaled_dot_product_attention(q, k, v, scale=scaling).permute(0, 2, 1, 3).reshape(1, S, H, d), None
    out = torch.empty_like(query)  # (1, H, S, d)
    for L in sorted(set(lengths)):
        idx = torch.cat([torch.arange(s, s + L, device=query.device) for s, n in zip(starts, lengths) if n == L])
        q, k, v = (t[0, :, idx].view(H, -1, L, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, d)
        out[0, :, idx] = F.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(0, 1).reshape(H, -1, d)
    return out.transpose(1, 2), None


def fast_vision(model) -> None:
    """Same numbers, less CPU time: batched vision attention (above) and the patch embedding's
    Conv3d, whose kernel equals its stride, run as the equivalent matrix product. For the CPU
    (grpo.build_model installs it there only): on CUDA the stock sdpa / flash-attention kernels are faster."""
    import types
    from transformers import AttentionInterface

    visual = getattr(model.model, "visual", None)
    if visual is None or visual.config._attn_implementation not in ("sdpa", "eager", None):
        return
    AttentionInterface.register("flash_varlen_sdpa", _varlen_sdpa)  # "flash" in the name: Qwen passes cu_seqlens
    visual.config._attn_implementation = "flash_varlen_sdpa"
    embed = visual.patch_embed
    if isinstance(getattr(embed, "proj", None), nn.Conv3d) and embed.proj.bias is None:
        def forward(self, x):
            w = self.proj.weight
            return F.linear(x.view(-1, w[0].numel()).to(w.dtype), w.view(w.shape[0], -1))
        embed.forward = types.MethodType(forward, embed)


def prefill(model, p: Prompts, features, cache):
    """Run the prompts into `cache`; returns the last prompt position's hidden state (B, D).
    The shared instruction runs once (1 row) and its KV is expanded to the B rows."""
    B, L = p.input_ids.shape[0], p.shared
    if L > 0:
        lm_hidden(model, p.input_ids[:1, :L], p.attention_mask[:1, :L], p.positions[:, :1, :L], None, cache)
        cache.batch_repeat_interleave(B)
    return lm_hidden(model, p.input_ids[:, L:], p.attention_mask, p.positions[:, :, L:], features, cache)[:, -1]


def lm_hidden(model, input_ids, attention_mask, positions, features=None, cache=None):
    """Last hidden states (R, T, D) of the language model, image features scattered in."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      mm_encoder_outputs={"image": features} if features is not None else None,
                      cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


def token_logprobs(lm_head, hidden, targets, temperature=1.0, banned=(), chunk=4096, entropy=False):
    """log pi(target) from hidden states (R, T, D) in chunks of positions, so memory never holds
    (all tokens x V) logits; banned token logits are masked before any exp (as in sampling)."""
    R, T, D = hidden.shape
    flat_h, flat_t = hidden.reshape(R * T, D), targets.reshape(R * T)
    logps, ents = [], []
    for s in range(0, R * T, chunk):
        args = (lm_head, flat_h[s:s + chunk], flat_t[s:s + chunk], temperature, banned, entropy)
        # under autograd each chunk's (chunk, V) float logits would be kept for backward, so memory
        # would grow with all tokens x V after all: recompute them in backward instead
        lp, ent = (torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() and R * T > chunk else _chunk_logprobs(*args))
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(R, T)
    return (logp, torch.cat(ents).view(R, T)) if entropy is not False and entropy is not None else logp


def _chunk_logprobs(lm_head, h, targets, temperature, banned, entropy):
    logits = lm_head(h).float() / temperature  # (chunk, V)
    if len(banned):
        logits[:, list(banned)] = torch.finfo(logits.dtype).min
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - logz
    if entropy is False or entropy is None:
        return logp, None
    if entropy is not True:  # a list of token ids: the entropy of the distribution renormalised over them
        logits = logits[:, list(entropy)]
        logz = torch.logsumexp(logits, dim=-1)
    logp_all = logits - logz[:, None]
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def completion_mask(ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after (the EOS keeps its gradient even if pad == eos)."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


# ----------------------------------------------------------------------------- rollouts

def sample_tokens(logits, temperature, top_p, generator=None):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    # inverse-CDF sampling, one uniform per row (torch.multinomial draws one per row and token);
    # u in (0, total]: the first index whose cumulative sum reaches u always has probability > 0
    cdf = probs.cumsum(-1)
    u = (1 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1)


@torch.no_grad()
def rollout(model, p: Prompts, K, max_new_tokens, eos_ids, pad_id, banned=(), temperature=1.0, top_p=None,
            shared_prefix=True, force_length=False):
    """K sampled completions per prompt, (B*K, Tc) token ids, image-major rows.

    shared_prefix: one vision pass and one prefill per image, the KV cache expanded K times.
    Otherwise the straightforward reference: B*K rows prefilled from scratch."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    if shared_prefix:
        last = prefill(model, p, image_features(model, p), cache).repeat_interleave(K, 0)
        cache.batch_repeat_interleave(K)
        attn, nxt = p.attention_mask.repeat_interleave(K, 0), p.next_position.repeat_interleave(K)
    else:
        r = repeat_prompts(p, K)
        last = lm_hidden(model, r.input_ids, r.attention_mask, r.positions, image_features(model, r), cache)[:, -1]
        attn, nxt = r.attention_mask, r.next_position
    R = last.shape[0]
    eos = torch.as_tensor(list(eos_ids), device=last.device)
    finished = torch.zeros(R, dtype=torch.bool, device=last.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = model.lm_head(last).float()  # (R, V)
        masked = list(banned) + (list(eos_ids) if force_length else [])
        if masked:
            logits[:, masked] = -float("inf")
        token = sample_tokens(logits, temperature, top_p) if temperature > 0 else logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = (nxt + t).view(1, R, 1).expand(3, R, 1)
        last = lm_hidden(model, token[:, None], attn, pos, None, cache)[:, -1]
    return torch.stack(tokens, dim=1)


def completion_logprobs(model, p: Prompts, K, ids, mask, temperature=1.0, banned=(), shared_prefix=True,
                        features=None, entropy=False):
    """Per-token log-probs (B*K, Tc) of the completions under the model, prompt and image included."""
    hidden = completion_hidden(model, p, K, ids, mask, shared_prefix, features)
    return token_logprobs(model.lm_head, hidden, ids, temperature, banned, entropy=entropy)


def completion_hidden(model, p: Prompts, K, ids, mask, shared_prefix=True, features=None):
    """(B*K, Tc, D) hidden states whose LM-head output predicts completion token t at position t.

    shared_prefix: the prompt (and vision tower) runs once per image and its KV cache, with its
    graph, is expanded to the K rows; only completion positions reach the LM head."""
    from transformers import DynamicCache

    Tc = ids.shape[1]
    offsets = torch.arange(Tc, device=ids.device)
    if shared_prefix and torch.is_grad_enabled() and model.training and _prefix_cache_breaks_backward(model):
        # repeat the prompt rows instead, keeping one vision pass per image
        features, shared_prefix = (features if features is not None else image_features(model, p)), False
    if shared_prefix:
        feats = features if features is not None else image_features(model, p)
        cache = DynamicCache(config=model.config.get_text_config())
        last = prefill(model, p, feats, cache)  # (B, D)
        cache.batch_repeat_interleave(K)
        attn = torch.cat([p.attention_mask.repeat_interleave(K, 0), mask], dim=1)
        pos = (p.next_position.repeat_interleave(K)[:, None] + offsets).unsqueeze(0).expand(3, -1, -1)
        hc = lm_hidden(model, ids, attn, pos, None, cache)  # (B*K, Tc, D)
        hidden = torch.cat([last[:, None].repeat_interleave(K, 0), hc[:, :-1]], dim=1)  # position t predicts token t
    else:
        r = repeat_prompts(p, K)
        feats = expand_features(features, K) if features is not None else image_features(model, r)
        Tp = r.input_ids.shape[1]
        pos = torch.cat([r.positions, (r.next_position[:, None] + offsets).unsqueeze(0).expand(3, -1, -1)], dim=2)
        h = lm_hidden(model, torch.cat([r.input_ids, ids], 1), torch.cat([r.attention_mask, mask], 1), pos, feats)
        hidden = h[:, Tp - 1:Tp - 1 + Tc]
    return hidden
