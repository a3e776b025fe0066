"""lora.py: the adapter in PEFT's file layout, loaded back by us, by mgiqa.load(adapter=...) and by PEFT
itself (same logits, same wrapped modules, same merge), and a merged checkpoint that equals base + adapter."""
import json
import re

import pytest
import torch

import grpo
import lora
import mgiqa
from conftest import full_logits, random_images, randomize_lora, small_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_peft_layout_adapter_loads_back(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    model, processor, _ = grpo.build_model(cfg)  # the model mgiqa.load("tiny") rebuilds
    randomize_lora(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", 4, 8, 0.0, "tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    wrapped = {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    assert set(config["target_modules"]) == wrapped and not any(".visual." in f".{n}." for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(lora.LM_TARGETS)
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, value in weights.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        assert m, key
        lin = modules[m.group(1)].base
        assert value.shape == ((4, lin.in_features) if m.group(2) == "A" else (lin.out_features, 4))
    images = random_images(2)
    want = full_logits(model, processor, images)
    loaded, _ = mgiqa.load("tiny", device="cpu", adapter=str(tmp_path / "adapter"))
    got = full_logits(loaded, processor, images)
    assert (want - full_logits(mgiqa.load("tiny", device="cpu")[0], processor, images)).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-4
    again, _, _ = grpo.build_model(cfg)  # into a wrapped model (what resume does)
    lora.load_adapter_weights(again, tmp_path / "adapter")
    assert (full_logits(again, processor, images) - want).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl"])
def test_peft_loads_our_adapter_with_our_logits_and_merge(tmp_path, name):
    """PEFT reads the adapter grpo.py writes (Qwen2.5-VL, and Qwen3-VL with its real processor): the
    same logits (1e-5), adapters on exactly the modules we trained, and PEFT's merge_and_unload equals
    ours (1e-6 on the weights)."""
    import peft  # test-only requirement (requirements.txt)
    import tiny
    tiny.save(name, str(tmp_path / "base"), seed=0, init_scale=0.2,
              prompts=(mgiqa.build_prompt(True), mgiqa.build_prompt(False)), keys=mgiqa.ATTRIBUTES)
    model, processor = mgiqa.load(str(tmp_path / "base"), device="cpu")
    lora.add_lora(model, rank=4, alpha=8, vision=name != "tiny")
    randomize_lora(model, std=0.2)
    lora.save_adapter(model, tmp_path / "adapter", 4, 8, 0.0, str(tmp_path / "base"))
    images = random_images(2, sizes=((64, 96), (96, 96)))
    ours = full_logits(model, processor, images)
    plain, _ = mgiqa.load(str(tmp_path / "base"), device="cpu")
    theirs_model = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    theirs = full_logits(theirs_model, processor, images)
    assert (ours - full_logits(mgiqa.load(str(tmp_path / "base"), device="cpu")[0], processor, images)).abs().max() > 1e-2
    assert (theirs - ours).abs().max() < 1e-5
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in theirs_model.named_modules()
                    if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    assert peft_wrapped == {n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    merged_theirs = theirs_model.merge_and_unload().state_dict()
    merged_ours = lora.merge_lora(model).state_dict()
    assert merged_theirs.keys() == merged_ours.keys()
    for n in merged_ours:
        assert (merged_theirs[n] - merged_ours[n]).abs().max() < 1e-6, n


def test_merged_checkpoint_gives_base_plus_adapter_logits(fresh, tmp_path):
    model, processor = fresh
    lora.add_lora(model, rank=4, alpha=8, vision=True)
    randomize_lora(model, std=0.2)
    images = random_images(2)
    want = full_logits(model, processor, images)
    with lora.adapters_disabled(model):
        assert (full_logits(model, processor, images) - want).abs().max() > 1e-2
    grpo.save_merged(model, processor, str(tmp_path / "merged"))
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    loaded, loaded_processor = mgiqa.load(str(tmp_path / "merged"), device="cpu")
    assert not any("lora" in n for n in loaded.state_dict())
    assert (full_logits(loaded, loaded_processor, images) - want).abs().max() < 1e-4


def test_merge_adds_in_fp32_and_casts_once():
    w = torch.full((4, 4), 0.02, dtype=torch.bfloat16)
    a, b = torch.full((1, 4), 1e-2), torch.full((4, 1), 1e-2)  # delta 2 * 4e-4 ... below half a bf16 ulp at 0.02? no: 8e-5
    delta = 2.0 * (b @ a)
    want = (w.float() + delta).to(torch.bfloat16)
    assert torch.equal(lora.merged_weight(w, a, b, 2.0), want)
    many = w.clone()
    for _ in range(8):  # eight small deltas added in bf16 one by one are lost; summed in fp32 they are not
        many += (delta / 8).to(torch.bfloat16)
    assert torch.equal(many, w) and not torch.equal(want, w)
