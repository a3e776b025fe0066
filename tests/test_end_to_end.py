"""The entry points as a user runs them, on a local folder shaped like a real checkpoint: a tiny random
Qwen2.5-VL or Qwen3-VL with the REAL processor files (tokenizer, chat template, image settings), saved
with save_pretrained. grpo.main trains it (LoRA in bf16 with gradient checkpointing and --merge, a
resume; --full in fp32), evaluate.main scores the merged folder, mgiqa.main scores with --adapter, and
scripts/gpu_check.py runs its CPU form; every JSON file they write is strict."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # minutes: five runs through the entry points with the real vocabulary

import evaluate
import grpo
import mgiqa
import synth
import tiny
from conftest import strict_json_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["-B", "2", "-K", "2", "--max-new-tokens", "6", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synth.make_synthetic(str(root), 12, 64, seed=0)
    return root


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    tiny.save(request.param, str(folder), seed=0)
    return folder


def test_lora_bf16_gradient_checkpointing_merge_resume_evaluate_and_score(checkpoint, dataset, tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    common = ["--data", f"manifest={dataset}", *SMALL, "--save-every", "1"]
    assert grpo.main(["--model", str(checkpoint), *common, "--out", str(run), "--steps", "1", "--dtype", "bfloat16",
                      "--gradient-checkpointing"]) == 0
    assert grpo.main(["--resume", str(run), "--steps", "2", "--merge", str(merged)]) == 0
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in log] == [1, 2] and log[0]["prompt_tokens"] > 250  # the real tokenizer's prompt
    config = json.loads((run / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["gradient_checkpointing"] is True
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["target_modules"] and not any(".visual." in f".{n}." for n in adapter["target_modules"])
    assert (merged / "config.json").is_file() and (merged / "tokenizer_config.json").is_file()
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(merged), "--data", f"manifest={dataset}", "--limit", "2", "--device", "cpu",
                          "--max-new-tokens", "6", "--out", str(out)]) == 0
    assert "summary.json" in strict_json_files(out) and strict_json_files(run)
    image = str(dataset / sorted(os.listdir(dataset / "images"))[0]) if (dataset / "images").is_dir() else None
    image = image or next(str(p) for p in dataset.rglob("*.png"))
    capsys.readouterr()
    assert mgiqa.main(["--model", str(checkpoint), "--adapter", str(run / "final"), image, "--json",
                       "--max-new-tokens", "6"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in mgiqa --json output"))
    assert set(mgiqa.ATTRIBUTES) <= set(record)


def test_full_fp32_run_writes_a_checkpoint_evaluate_opens(dataset, tmp_path):
    checkpoint = tmp_path / "model"
    tiny.save("tiny-qwen2.5-vl", str(checkpoint), seed=0)
    run = tmp_path / "run"
    assert grpo.main(["--model", str(checkpoint), "--data", f"manifest={dataset}", *SMALL, "--full", "--dtype", "float32",
                      "--out", str(run), "--steps", "1", "--save-every", "0", "--lr", "1e-4"]) == 0
    model, processor = mgiqa.load(str(run / "final"), device="cpu")
    assert model.config.model_type == "qwen2_5_vl" and len(processor.tokenizer) == 151665
    assert evaluate.main(["--model", str(run / "final"), "--data", f"manifest={dataset}", "--limit", "2", "--device", "cpu",
                          "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0


@pytest.mark.parametrize("config", ["tiny-qwen2.5-vl"])  # Qwen3-VL through the same entry points: the test above
def test_gpu_check_runs_its_cpu_form(config, tmp_path):
    """scripts/gpu_check.py through grpo.main and evaluate.main, on the CPU: per-phase figures for every step."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--config", config, "-B", "2",
                           "-K", "2", "--max-new-tokens", "6", "--steps", "2", "--work", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"event"')]
    assert [e["event"] for e in events] == ["built", "step", "step", "train", "evaluate", "done"]
    first, second = events[1], events[2]
    assert set(first["phases"]) == {"sampling", "reward", "reference", "update"} and "save_previous" in second["phases"]
    unit = 28 if "2.5" in config else 32  # 512x384 -> (512/u) (384/u) tokens; 4000x3000 capped at 1,280
    assert first["image_tokens"] <= (512 // unit) * (384 // unit) + 1280 and first["prompt_tokens"] > 250
