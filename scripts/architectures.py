"""The published architectures that scripts/gpu_check.py builds and scripts/fit.py measures, in
one place: text model and vision tower of each, as transformers configs, at full or reduced depth.

    from architectures import NAMES, config
    config("qwen3-vl-4b")                                # the published depth
    config("qwen2.5-vl-7b", text_layers=2, vision_depth=3)  # the same width, fewer layers

Where the numbers come from (read from the models' config.json files on the Hugging Face hub,
quoted here from memory of them, not downloaded by this session: no network where it was written):
- Qwen/Qwen2.5-VL-7B-Instruct: checked field by field against the published file by an earlier
  session (text 3584 wide, MLP 18944, 28 layers, 28 heads, 4 kv heads, vocabulary 152064, untied
  LM head; vision 32 blocks 1280 wide, MLP 3420, 16 heads, full attention in blocks 7/15/23/31).
- Qwen/Qwen3-VL-2B / 4B / 8B-Instruct: the text models are Qwen3-1.7B / 4B / 8B (2048 / 2560 / 4096
  wide, MLP 6144 / 9728 / 12288, 28 / 36 / 36 layers, 16 / 32 / 32 heads, 8 kv heads, head dim 128,
  tied / tied / untied embeddings, vocabulary 151936); the vision towers are SigLIP-2 shaped: 2B and
  4B 24 blocks 1024 wide (MLP 4096, 16 heads, deepstack from blocks 5/11/17), 8B 27 blocks 1152 wide
  (MLP 4304, 16 heads, deepstack 8/16/24); all patch 16, merge 2, 2,304 position embeddings. Fairly
  sure of every value (they agree with the Qwen3 technical report's table of the text models); not
  checked against the files: check `config.json` of the checkpoint before relying on a figure, or
  pass that checkpoint folder to fit.py --model (its config.json is then used, not these values).

Reduced depth keeps the layer types valid: a Qwen2.5-VL tower of depth d has full attention in its
last block only (the others windowed, as 28 of the 32 published blocks are); a Qwen3-VL tower keeps
three deepstack taps (from blocks 0, 1, 2: depth >= 3), as the published ones have three.
"""
from __future__ import annotations

QWEN25_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                       "rope_theta": 1000000.0})
QWEN25_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                        out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                        temporal_patch_size=2, window_size=112, tokens_per_second=2,
                        fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_ROPE = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
              "rope_theta": 5000000.0}
QWEN3_TEXT = {
    "qwen3-vl-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=False),
    "qwen3-vl-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=True),
    "qwen3-vl-2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=True),
}
QWEN3_VISION = {
    "qwen3-vl-8b": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                        deepstack_visual_indexes=[8, 16, 24]),
    "qwen3-vl-4b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                        deepstack_visual_indexes=[5, 11, 17]),
    "qwen3-vl-2b": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                        deepstack_visual_indexes=[5, 11, 17]),
}
PUBLISHED = ("qwen2.5-vl-7b", *QWEN3_TEXT)
TINY = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")  # tiny.py's test models: toy width, the real vocabulary
NAMES = (*PUBLISHED, *TINY)

# Qwen's special-token ids (tests/fixtures, tiny.QWEN_IDS), as in the published checkpoints
SPECIAL = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
VISION_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653)


def family(name_or_config) -> str:
    """The fixture family ("tiny-qwen2.5-vl" or "tiny-qwen3-vl") of a model's real processor."""
    kind = name_or_config if isinstance(name_or_config, str) else name_or_config.model_type
    if kind in ("qwen2_vl", "qwen2_5_vl") or kind.startswith(("qwen2.5", "tiny-qwen2.5")):
        return "tiny-qwen2.5-vl"
    if kind == "qwen3_vl" or kind.startswith(("qwen3", "tiny-qwen3")):
        return "tiny-qwen3-vl"
    raise ValueError(f"no processor family for {kind!r} (Qwen2-VL, Qwen2.5-VL or Qwen3-VL)")


def published(name: str):
    """The transformers config of a published architecture (full depth), special ids as Qwen's."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    if name == "qwen2.5-vl-7b":
        return Qwen2_5_VLConfig(text_config={**QWEN25_TEXT_7B, **SPECIAL},
                                vision_config=dict(QWEN25_VISION_7B), tie_word_embeddings=False,
                                **VISION_TOKENS, **SPECIAL)
    if name in QWEN3_TEXT:
        text = {**QWEN3_TEXT[name], "vocab_size": 151936, "rope_parameters": dict(QWEN3_ROPE),
                "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, **SPECIAL}
        vision = {**QWEN3_VISION[name], "out_hidden_size": text["hidden_size"], "patch_size": 16,
                  "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "num_position_embeddings": 2304}
        return Qwen3VLConfig(text_config=text, vision_config=vision,
                             tie_word_embeddings=text["tie_word_embeddings"], **VISION_TOKENS,
                             **SPECIAL)
    if name in TINY:  # tiny.py's own config, its model built on the meta device (no weights)
        import torch
        import tiny
        with torch.device("meta"):
            return tiny.build(name)[0].config
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(NAMES)}")


def depths(config) -> tuple[int, int]:
    """(language-model layers, vision blocks) of a config."""
    return config.text_config.num_hidden_layers, config.vision_config.depth


def min_vision_depth(config) -> int:
    """The shallowest tower that keeps every block type: a windowed and a full-attention block
    (Qwen2.5-VL), three deepstack taps (Qwen3-VL)."""
    if config.model_type == "qwen3_vl":
        return 3
    return 2 if config.model_type == "qwen2_5_vl" else 1


def with_depth(config, text_layers: int, vision_depth: int):
    """A copy of config with text_layers language-model layers and vision_depth vision blocks."""
    import copy

    if vision_depth < min_vision_depth(config):
        least = min_vision_depth(config)
        raise ValueError(f"vision depth {vision_depth} < {least}, the least that keeps every block "
                         f"type of {config.model_type}")
    c = copy.deepcopy(config)
    c.text_config.num_hidden_layers = text_layers
    if getattr(c.text_config, "layer_types", None) is not None:
        c.text_config.layer_types = [c.text_config.layer_types[0]] * text_layers
    c.vision_config.depth = vision_depth
    if c.model_type == "qwen2_5_vl":
        c.vision_config.fullatt_block_indexes = [vision_depth - 1]
    if c.model_type == "qwen3_vl":
        c.vision_config.deepstack_visual_indexes = [0, 1, 2]
    return c


def config(name: str, text_layers: int | None = None, vision_depth: int | None = None):
    """Architecture `name`'s config, at its published depth unless text_layers / vision_depth."""
    c = published(name)
    if text_layers is None and vision_depth is None:
        return c
    L, V = depths(c)
    return with_depth(c, text_layers or L, vision_depth or V)
