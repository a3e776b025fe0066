"""Runs that span processes: torchrun with two gloo ranks on the CPU (DDP for LoRA, FSDP2 for
--full), exact resume on every rank, and a run killed with SIGKILL then resumed. Each run is a
subprocess through tests/launch.py, which patches in conftest.text_reward (see there)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # torchrun subprocesses: about two minutes
import torch
from safetensors.torch import load_file

import evaluate
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "tests", "launch.py")
SMALL = ["-B", "2", "-K", "2", "--max-new-tokens", "6", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synth.make_synthetic(str(root), 30, 56, seed=0)
    return f"manifest={root}"


def run(args, ranks=1, timeout=300, **env):
    """grpo.main through tests/launch.py: a plain process, or torchrun with `ranks` gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MGIQA_TEST_TEXT_REWARD": "1", **env}
    head = [sys.executable, LAUNCH] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), LAUNCH]
    return subprocess.run(head + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def batches(out, rank):
    return [json.loads(ln) for ln in (out / f"batches-rank{rank}.jsonl").read_text().splitlines()]


def assert_equal_weights(a, b):
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n} differs"


def test_torchrun_two_ranks_resume_equals_uninterrupted_bit_for_bit(manifest, tmp_path):
    common = ["--data", manifest, *SMALL, "--lr", "1e-2", "--save-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run([*common, "--out", straight, "--steps", "4"], ranks=2))
    ok(run([*common, "--out", split, "--steps", "2"], ranks=2))
    ok(run(["--resume", split, "--steps", "4", "--threads", "1"], ranks=2))
    for rank in (0, 1):
        assert batches(split, rank) == batches(straight, rank)  # steps 1-2, then 3-4 after the resume
        assert_equal_weights(load_file(str(split / f"weights-rank{rank}.safetensors")),
                             load_file(str(straight / f"weights-rank{rank}.safetensors")))
    assert batches(split, 0)[2:] != batches(split, 1)[2:]  # each rank its own stream after the resume
    w0, init = load_file(str(split / "weights-rank0.safetensors")), split / "checkpoint-2" / "rank-1.pt"
    assert_equal_weights(w0, load_file(str(split / "weights-rank1.safetensors")))  # DDP kept the ranks equal
    assert init.is_file() and any(w0[n].abs().sum() > 0 for n in w0 if ".lora_B" in n)
    steps = [json.loads(ln)["step"] for ln in (split / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sigkill_after_second_checkpoint_then_resume_gives_the_same_adapter(manifest, tmp_path):
    common = ["--data", manifest, *SMALL, "--lr", "1e-2", "--save-every", "2", "--steps", "6"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run([*common, "--out", straight]))
    proc = run([*common, "--out", killed], MGIQA_TEST_KILL_AFTER="4")
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL: no cleanup ran
    assert not (killed / "final").exists() and (killed / "checkpoint-4" / "trainer_state.pt").is_file()
    ok(run(["--resume", killed, "--threads", "1"]))
    a = load_file(str(killed / "final" / "adapter_model.safetensors"))
    b = load_file(str(straight / "final" / "adapter_model.safetensors"))
    assert_equal_weights(a, b)
    assert batches(killed, 0)[4:] == batches(straight, 0)[4:]


def test_fsdp_two_ranks_full_resume_matches_one_process_and_opens_in_evaluate(manifest, tmp_path):
    """--full --fsdp on 2 gloo ranks that draw the same stream (so their averaged gradient is one
    process's gradient): 2 steps, resume to 4; the gathered weights equal a single-process --full run's
    within 5e-5 (sharded reductions add in another order; AdamW magnifies tiny gradient
    differences), the gradient norms within 1e-4 relative, and evaluate.py opens final/. Both runs use
    gradient checkpointing, so that combination is covered too."""
    common = ["--data", manifest, *SMALL, "--full", "--lr", "1e-3", "--save-every", "2", "--dtype", "float32",
              "--gradient-checkpointing"]
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    ok(run([*common, "--fsdp", "--out", fsdp, "--steps", "2"], ranks=2, MGIQA_TEST_SAME_STREAM="1"))
    assert (fsdp / "checkpoint-2" / "sharded").is_dir()
    ok(run(["--resume", fsdp, "--steps", "4", "--threads", "1"], ranks=2, MGIQA_TEST_SAME_STREAM="1"))
    ok(run([*common, "--out", single, "--steps", "4"]))
    got, want = load_file(str(fsdp / "weights-rank0.safetensors")), load_file(str(single / "weights-rank0.safetensors"))
    assert got.keys() == want.keys() and len(got) > 10
    init = load_file(str(single / "checkpoint-2" / "trainable.safetensors"))
    assert any(not torch.equal(want[n], init[n]) for n in want)  # steps 3-4 moved the weights
    worst = max(float((got[n] - want[n]).abs().max()) for n in got)
    assert worst < 5e-5, worst  # of an update of up to 4e-3
    logs = [[json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()] for d in (fsdp, single)]
    for a, b in zip(*logs):  # AdamW hides a gradient scale error in the weights; the norm does not
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and a["reward"] == b["reward"]
    assert batches(fsdp, 0) == batches(fsdp, 1) == batches(single, 0)
    code = evaluate.main(["--model", str(fsdp / "final"), "--data", manifest, "--limit", "2", "--device", "cpu",
                          "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    assert code == 0 and (tmp_path / "eval" / "summary.json").is_file()
