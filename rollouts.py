"""The policy's two jobs in a GRPO step (docs/METHOD.md, "GRPO", steps 1 and 4): sample K completions
per image, and compute the per-token log-probs of those completions (logits / temperature, log-softmax,
gather; the completion mask runs up to and including the first EOS).

Read the plain path first: every prompt repeated K times, exactly as the equations are written
(`sample_plain`, `logprobs_plain`). The shared-prefix path that follows is the default and gives the
same numbers (tests/test_rollouts.py): the vision tower and the prompt run once per image, not K times
(docs/METHOD.md, section 7, departure 5):
- `sample_shared` prefills each image's prompt once and copies its KV cache to the K rows;
- `logprobs_shared` packs [prompt, completion 1, ..., completion K] into ONE row per image, with a
  block attention mask (each completion sees the prompt and itself), so one ordinary forward trains
  all K completions. No cache is carried across calls, so gradient checkpointing and FSDP2 work on it.

Why our own sampling loop beside transformers' `generate` (which mgiqa.score uses): the shared prefix,
a precomputed vision output (the demo's frozen tower) and one mask of banned tokens applied identically
in sampling and in the log-softmax. tests/test_rollouts.py checks that greedy tokens equal `generate`'s.

Shapes: B images, K rollouts, T tokens, D hidden, V vocabulary. Rows are image-major: the K rollouts
of image i are rows i*K .. i*K+K-1.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- prompts

@dataclass
class Prompts:
    """B encoded prompts, one image each, left padded."""
    input_ids: torch.Tensor       # (B, Tp)
    attention_mask: torch.Tensor  # (B, Tp)
    positions: torch.Tensor       # (3, B, Tp) multimodal rope positions, as the model computes them
    next_position: torch.Tensor   # (B,) the position of the first completion token
    pixel_values: torch.Tensor    # (sum of patches, C)
    image_grid_thw: torch.Tensor  # (B, 3)
    features: tuple | None = None  # per image, the vision tower's output computed beforehand (a frozen
                                   # tower, e.g. the demo's): used instead of running the tower


def encode_prompts(model, processor, images, text: str) -> Prompts:
    """The chat text with one image each, through the processor, left padded (the real Qwen
    tokenizer pads on the right unless told), with the model's own rope positions."""
    from mgiqa import load_image

    device = next(model.parameters()).device
    processor.tokenizer.padding_side = "left"
    enc = processor(text=[text] * len(images), images=[load_image(im) for im in images],
                    padding=True, return_tensors="pt").to(device)
    positions, _ = model.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                              image_grid_thw=enc["image_grid_thw"], attention_mask=enc["attention_mask"])
    return Prompts(enc["input_ids"], enc["attention_mask"], positions, positions.amax(dim=(0, 2)) + 1,
                   enc["pixel_values"], enc["image_grid_thw"])


def select(p: Prompts, idx: list[int]) -> Prompts:
    """The prompts of images idx, with their pixel rows."""
    blocks = torch.split(p.pixel_values, p.image_grid_thw.prod(-1).tolist())
    return Prompts(p.input_ids[idx], p.attention_mask[idx], p.positions[:, idx], p.next_position[idx],
                   torch.cat([blocks[i] for i in idx]), p.image_grid_thw[idx],
                   None if p.features is None else tuple(p.features[i] for i in idx))


def repeat_prompts(p: Prompts, K: int) -> Prompts:
    """Every prompt, and its image's pixel rows, repeated K times (image-major, as generate's
    num_return_sequences; tiling the pixel rows instead would pair rows with the wrong image)."""
    return select(p, [i for i in range(p.input_ids.shape[0]) for _ in range(K)])


def to_device(p: Prompts, device) -> Prompts:
    return dataclasses.replace(p, **{f.name: _move(getattr(p, f.name), device) for f in dataclasses.fields(p)})


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return tuple(_move(v, device) for v in value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- the model's forward

def image_features(model, p: Prompts):
    """The vision tower's output for the B images (pooler_output: one block per image; Qwen3-VL adds
    its deepstack features), or the precomputed one."""
    if p.features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(pooler_output=p.features)
    return model.model.get_image_features(p.pixel_values, p.image_grid_thw, return_dict=True)


def lm_hidden(model, input_ids, attention_mask, positions, features=None, cache=None):
    """Last hidden states (R, T, D) of the language model, the image features scattered into the
    image tokens; attention_mask (R, T) or a prepared boolean (R, 1, T, T) mask."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      mm_encoder_outputs={"image": features} if features is not None else None,
                      cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


def token_logprobs(lm_head, hidden, targets, temperature=1.0, banned=None, entropy_ids=None, chunk=4096):
    """log pi(target) (R, T) from hidden states (R, T, D), in chunks of positions so that memory never
    holds (all tokens x V) logits; banned: a (V,) bool mask of tokens never sampled, masked before any
    exp. With entropy_ids, also the entropy (R, T) of the distribution renormalised over those tokens."""
    R, T, D = hidden.shape
    flat_h, flat_t = hidden.reshape(R * T, D), targets.reshape(R * T)
    logps, ents = [], []
    for s in range(0, R * T, chunk):
        args = (lm_head, flat_h[s:s + chunk], flat_t[s:s + chunk], temperature, banned, entropy_ids)
        # under autograd each chunk's (chunk, V) fp32 logits would be kept for backward: recompute them there
        lp, ent = (torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() and R * T > chunk else _chunk_logprobs(*args))
        logps.append(lp)
        ents.append(ent)
    entropy = None if entropy_ids is None else torch.cat(ents).view(R, T)
    return torch.cat(logps).view(R, T), entropy


def _chunk_logprobs(lm_head, h, targets, temperature, banned, entropy_ids):
    logits = lm_head(h).float() / temperature  # (chunk, V)
    if banned is not None:
        logits = logits.masked_fill(banned[: logits.shape[-1]], torch.finfo(logits.dtype).min)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    if entropy_ids is None:
        return logp, None
    sub = torch.log_softmax(logits[:, entropy_ids], dim=-1)
    return logp, -(sub.exp() * sub).sum(-1)


def completion_mask(ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after (the EOS keeps its gradient even if pad == eos)."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device))
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


# ----------------------------------------------------------------------------- sampling

def sample_tokens(logits, temperature, top_p=None, generator=None):
    """One token per row: temperature sampling (nucleus when top_p < 1), greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
    # inverse-CDF sampling, one uniform per row; u in (0, total]: the index found always has probability > 0
    cdf = probs.cumsum(-1)
    u = (1 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_plain(model, p: Prompts, *, K, max_new_tokens, eos_ids, pad_id, banned=None, temperature=1.0, top_p=None,
                 force_length=False):
    """K completions per image (B*K, T): every prompt repeated K times and prefilled from scratch."""
    from transformers import StaticCache

    r = repeat_prompts(p, K)
    attn = _full_mask(r.attention_mask, max_new_tokens)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=attn.shape[1])
    last = lm_hidden(model, r.input_ids, attn, r.positions, image_features(model, r), cache)[:, -1]
    return _decode(model, last, cache, attn, r.next_position, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                   pad_id=pad_id, banned=banned, temperature=temperature, top_p=top_p, force_length=force_length)


@torch.no_grad()
def sample_shared(model, p: Prompts, *, K, max_new_tokens, eos_ids, pad_id, banned=None, temperature=1.0, top_p=None,
                  force_length=False):
    """The same, the shared-prefix way: one vision pass and one prefill per image, the KV cache
    copied to the K rows (image-major) before the first token is drawn."""
    from transformers import DynamicCache, StaticCache

    prefill = DynamicCache(config=model.config.get_text_config())
    last = lm_hidden(model, p.input_ids, p.attention_mask, p.positions, image_features(model, p), prefill)[:, -1]
    attn = _full_mask(p.attention_mask.repeat_interleave(K, 0), max_new_tokens)
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=attn.shape[1])
    for src, dst in zip(prefill.layers, cache.layers):  # allocates each layer at (B*K, heads, Tp + T, d)
        dst.update(src.keys.repeat_interleave(K, 0), src.values.repeat_interleave(K, 0))
    del prefill
    return _decode(model, last.repeat_interleave(K, 0), cache, attn, p.next_position.repeat_interleave(K),
                   max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, banned=banned,
                   temperature=temperature, top_p=top_p, force_length=force_length)


def _full_mask(prompt_mask, max_new_tokens):
    """(R, Tp + T): the prompt's padding mask, then ones for the tokens to come. A static cache holds
    Tp + T slots from the start, so every step passes this whole mask; causality hides the slots
    not yet written."""
    return torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens)], dim=1)


def _decode(model, last, cache, attn, next_position, *, max_new_tokens, eos_ids, pad_id, banned, temperature,
            top_p, force_length, check_every=16):
    """The token loop shared by both paths: (R, T) sampled ids, pad after each row's first EOS.
    The host learns whether every row has finished only every `check_every` tokens (no per-token sync);
    cache: a StaticCache of Tp + max_new_tokens slots written in place (no concatenation); attn (R, Tp + T)."""
    R, V = last.shape[0], model.lm_head.out_features
    eos = torch.as_tensor(list(eos_ids), device=last.device)
    masked = torch.zeros(V, dtype=torch.bool, device=last.device) if banned is None else banned[:V].clone()
    if force_length:
        masked[eos] = True
    finished = torch.zeros(R, dtype=torch.bool, device=last.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = model.lm_head(last).float().masked_fill(masked, float("-inf"))  # (R, V)
        token = torch.where(finished, pad_id, sample_tokens(logits, temperature, top_p))
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if t == max_new_tokens - 1 or (t % check_every == check_every - 1 and bool(finished.all())):
            break
        pos = (next_position + t).view(1, R, 1).expand(3, R, 1)
        with one_query_attention(last.device):
            last = lm_hidden(model, token[:, None], attn, pos, None, cache)[:, -1]
    ids = torch.stack(tokens, dim=1)
    return ids[:, : int(completion_mask(ids, eos_ids).sum(1).max())]  # drop the all-pad tail after an early stop


def one_query_attention(device):
    """The attention kernel for one new token per row: on the CPU, torch's plain (math) one, which is
    faster for a single query (the demo's sampling, both kernels alternating in one process: 0.115 s
    a step against 0.133-0.145 s; scripts/bench.py's decoding_ratio); elsewhere torch's own choice."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


# ----------------------------------------------------------------------------- log-probs

def logprobs_plain(model, p: Prompts, ids, mask, *, K, temperature=1.0, banned=None, entropy_ids=None):
    """Per-token log-probs (B*K, T) of completions ids under the model: each prompt repeated K times,
    one forward over prompt + completion (and, with entropy_ids, the score entropy; else None)."""
    return token_logprobs(model.lm_head, hidden_plain(model, p, ids, mask, K=K), ids, temperature, banned, entropy_ids)


def hidden_plain(model, p: Prompts, ids, mask, *, K):
    """(B*K, T, D) hidden states whose LM-head output predicts completion token t at position t."""
    r, T = repeat_prompts(p, K), ids.shape[1]
    Tp = r.input_ids.shape[1]
    pos = torch.cat([r.positions, completion_positions(r.next_position, T)], dim=2)
    h = lm_hidden(model, torch.cat([r.input_ids, ids], 1), torch.cat([r.attention_mask, mask], 1), pos, image_features(model, r))
    return h[:, Tp - 1:Tp - 1 + T]


def logprobs_shared(model, p: Prompts, ids, mask, *, K, temperature=1.0, banned=None, entropy_ids=None):
    """The same numbers, the shared-prefix way (hidden_shared)."""
    return token_logprobs(model.lm_head, hidden_shared(model, p, ids, mask, K=K), ids, temperature, banned, entropy_ids)


def hidden_shared(model, p: Prompts, ids, mask, *, K):
    """As hidden_plain, with image i's row packed as [prompt, completion 1, ..., completion K] and a block
    mask that lets completion k attend to the prompt and to itself only (as if alone after it). The
    first S prompt tokens, when every row has them alike (shared_instruction), run once for the batch:
    their KV cache, with its graph, is expanded to the B rows."""
    from transformers import DynamicCache

    (B, Tp), T = p.input_ids.shape, ids.shape[1]
    packed = torch.cat([p.input_ids, ids.reshape(B, K * T)], dim=1)                               # (B, Tp + K*T)
    pos = torch.cat([p.positions, completion_positions(p.next_position, T).repeat(1, 1, K)], dim=2)
    attn = block_mask(p.attention_mask, mask.reshape(B, K, T))                                   # (B, 1, L, L)
    S, cache = shared_instruction(model, p), None
    if S:
        cache = DynamicCache(config=model.config.get_text_config())
        lm_hidden(model, packed[:1, :S], attn[:1, :, :S, :S], pos[:, :1, :S], None, cache)
        cache.batch_repeat_interleave(B)
    h = lm_hidden(model, packed[:, S:], attn[:, :, S:], pos[:, :, S:], image_features(model, p), cache)
    last = h[:, Tp - S - 1, None, None].expand(B, K, 1, h.shape[-1])                             # predicts token 0
    return torch.cat([last, h[:, Tp - S:].view(B, K, T, -1)[:, :, :-1]], dim=2).reshape(B * K, T, -1)


def shared_instruction(model, p: Prompts) -> int:
    """How many leading prompt tokens, before the first image token, every row has alike and
    unpadded (images of one size under one prompt text: the demo's 74 of 89 prompt tokens; its
    training forward and backward then took 0.76-0.90 of the time, both ways alternating in one
    process; scripts/bench.py's instruction_ratio). 0 for one row, for left-padded
    rows, under gradient checkpointing (transformers drops a KV cache there) and under FSDP2 (a
    layer run twice in one forward: not exercised by this project's tests)."""
    from torch.distributed.fsdp import FSDPModule

    ids, keep = p.input_ids, p.attention_mask.bool()
    layers = model.model.language_model.layers
    if ids.shape[0] < 2 or model.is_activation_checkpointing or isinstance(layers[0], FSDPModule):
        return 0
    alike = ((ids == ids[:1]) & keep).all(0).int().cumprod(0)                                 # 1 while every row agrees
    images = (ids[0] == model.config.image_token_id).nonzero()
    before = int(images[0]) - 1 if len(images) else ids.shape[1]  # <|vision_start|> stays with its image
    return max(0, min(int(alike.sum()), before))


def completion_positions(next_position, T):
    """(3, R, T): completion token t of a row sits at that row's next position + t on all three rope axes."""
    pos = next_position[:, None] + torch.arange(T, device=next_position.device)
    return pos.unsqueeze(0).expand(3, -1, -1)


def block_mask(prompt_mask, completion_mask):
    """(B, 1, L, L) boolean attention mask of packed rows, L = Tp + K*T: the prompt is causal over its
    real tokens; completion k sees the prompt and its own earlier tokens. Every query sees itself, so a
    padded row never softmaxes over nothing (its output is never read)."""
    (B, Tp), (_, K, T) = prompt_mask.shape, completion_mask.shape
    L, dev = Tp + K * T, prompt_mask.device
    seg = torch.cat([torch.full((Tp,), -1, device=dev), torch.arange(K, device=dev).repeat_interleave(T)])  # (L,)
    keys = torch.cat([prompt_mask, completion_mask.reshape(B, K * T)], dim=1).bool()                     # (B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    visible = (seg[None, :] == -1) | (seg[:, None] == seg[None, :])                                      # (L, L)
    mask = (causal & visible)[None] & keys[:, None, :]
    return (mask | torch.eye(L, dtype=torch.bool, device=dev)[None]).unsqueeze(1)


# ----------------------------------------------------------------------------- the wrapped policy

class Policy(nn.Module):
    """The module DDP and FSDP2 wrap. Its forward is the training forward (per-token log-probs), so their
    hooks (gradient all-reduce, all-gather of shards) fire on it; sampling calls the unwrapped model
    inside distributed.gathered (a no-op without FSDP)."""

    def __init__(self, model, shared_prefix: bool = True):
        super().__init__()
        self.model, self.shared_prefix = model, shared_prefix

    def forward(self, p: Prompts, ids, mask, *, K, temperature=1.0, banned=None, entropy_ids=None):
        logprobs = logprobs_shared if self.shared_prefix else logprobs_plain
        return logprobs(self.model, p, ids, mask, K=K, temperature=temperature, banned=banned, entropy_ids=entropy_ids)

    def sample(self, p: Prompts, **kwargs):
        return (sample_shared if self.shared_prefix else sample_plain)(self.model, p, **kwargs)


# ----------------------------------------------------------------------------- vision attention

def _varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                 max_length_q=None, **kwargs):
    """Vision attention over many windows in ONE sdpa call: (1, H, S, d) split by cu_seq_lens into
    independent sequences, gathered into (windows, H, L_max, d) with a key mask for the shorter ones
    (never one S x S mask). transformers' own non-flash path runs one sdpa per window (thousands per
    pass for big images). L_max is max_length_q, which the tower computes once per forward for its
    window layers and once for its full-attention ones (no host sync per layer)."""
    _, H, S, d = query.shape
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    n, L = len(lengths), int(max_length_q) if max_length_q is not None else int(lengths.max())
    if L * n == S:  # same-size windows: one view, no copies, no mask (flash-eligible on CUDA)
        q, k, v = (t.view(H, n, L, d).transpose(0, 1) for t in (query, key, value))  # (n, H, L, d)
        return F.scaled_dot_product_attention(q, k, v, scale=scaling).permute(0, 2, 1, 3).reshape(1, S, H, d), None
    span = torch.arange(L, device=query.device)
    valid = span < lengths.to(query.device)[:, None]  # (n, L): window w's first lengths[w] slots are real
    idx = (cu_seq_lens_q[:-1].to(query.device)[:, None] + span).clamp(max=S - 1)  # padded slots repeat a token
    q, k, v = (t[0][:, idx].transpose(0, 1) for t in (query, key, value))  # (n, H, L, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    return out.transpose(1, 2)[valid].unsqueeze(0), None  # windows tile 0..S-1 in order: (1, S, H, d)


def fast_vision(model) -> None:
    """Same numbers, fewer kernel launches: the vision tower's windowed attention as ONE varlen call
    per layer (flash-attn's kernel on CUDA when the package is installed; else _varlen_sdpa above),
    and the patch embedding's Conv3d, whose kernel equals its stride, as the equivalent matrix product.
    The language model keeps sdpa (its training forward takes a 4-D block mask, which flash-attn cannot)."""
    import importlib.util
    import types
    from transformers import AttentionInterface

    visual = getattr(model.model, "visual", None)
    if visual is None or visual.config._attn_implementation not in ("sdpa", "eager", None):
        return  # a user's choice (e.g. loaded with flash_attention_2) stays
    weight = next(visual.parameters())
    half_on_cuda = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)  # what flash-attn runs on
    if half_on_cuda and importlib.util.find_spec("flash_attn") is not None:
        try:
            visual.set_attn_implementation("flash_attention_2")
        except (ImportError, ValueError) as err:  # a flash-attn that does not fit this torch / GPU: our sdpa instead
            print(f"fast_vision: flash_attention_2 unavailable ({err}); batched sdpa instead", flush=True)
    if visual.config._attn_implementation != "flash_attention_2":
        AttentionInterface.register("flash_varlen_sdpa", _varlen_sdpa)  # "flash" in the name: Qwen passes cu_seqlens
        visual.config._attn_implementation = "flash_varlen_sdpa"
    embed = visual.patch_embed
    if isinstance(getattr(embed, "proj", None), nn.Conv3d) and embed.proj.bias is None:
        def forward(self, x):
            w = self.proj.weight
            return F.linear(x.view(-1, w[0].numel()).to(w.dtype), w.view(w.shape[0], -1))
        embed.forward = types.MethodType(forward, embed)
