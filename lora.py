"""LoRA written out (no peft), for grpo.py: adapters on the language model's projections (and
optionally the vision tower's), the reference policy as the same model with its adapters switched
off, and the adapter saved in PEFT's file layout so that `peft`, `mgiqa.py --adapter` and
`evaluate.py --adapter` all read it.

A new adapter is a no-op (B = 0). Defaults as the README's GPU recipe: rank 64, alpha 128, dropout 0
(rho = 1 on the first update whatever the dropout: grpo_step takes the old log-probs as
logp.detach()). VisualQuality-R1 fine-tunes every weight instead (`grpo.py --full`). A and B are
stored fp32 whatever the base dtype (as PEFT): a bf16 adapter at lr 1e-5 loses most of its updates
to rounding. The forward runs the adapter's matmuls in the compute dtype
(bf16 on a GPU: fp32 activations would cost ~13 GB more for 7B and ~35% of matmul time), and the
gradients reach the fp32 weights through the cast; merging adds the delta in fp32 and casts once.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")  # Qwen2.5-VL; Qwen3-VL


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x); A ~ Kaiming-uniform, B = 0, so a new adapter is a no-op."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            dtype = out.dtype  # the compute dtype; the cast's backward brings fp32 gradients to A and B
            out = out + (self.dropout(x).to(dtype) @ self.lora_A.to(dtype).t() @ self.lora_B.to(dtype).t()) * self.scale
        return out


def add_lora(model, rank=64, alpha=128, dropout=0.0, targets=LM_TARGETS, vision=False) -> list[str]:
    """Wrap the language model's (and optionally the vision tower's) projections; freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        in_vision = ".visual." in f".{name}."
        wanted = (leaf in VISION_TARGETS and in_vision and vision) or (leaf in targets and not in_vision)
        if isinstance(module, nn.Linear) and wanted:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear matched the LoRA targets {targets}")
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference policy: the same weights with every adapter switched off (no second copy)."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names: base_model.model.<module>.lora_A.weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    return out


def save_adapter(model, out_dir, rank, alpha, dropout, base_model_name="") -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # full module names, not suffixes: a suffix such as gate_proj also matches the vision tower's MLP
    names = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": names, "bias": "none", "base_model_name_or_path": base_model_name,
              "fan_in_fan_out": False, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(lora_state_dict(model), str(out_dir / "adapter_model.safetensors"))


def load_adapter_weights(model, adapter_dir) -> None:
    """Load a PEFT-layout adapter into a model that add_lora already wrapped."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_A.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
                m.lora_B.copy_(weights[f"base_model.model.{name}.lora_B.weight"])


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A computed in fp32, cast once to W's dtype (added in bf16, small deltas vanish)."""
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def merge_lora(model):
    """Fold every adapter into its base weight and unwrap: a plain transformers model again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.base.weight.copy_(merged_weight(m.base.weight, m.lora_A, m.lora_B, m.scale))
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], m.base)
    return model
