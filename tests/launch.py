"""grpo.main with test hooks, for runs in a subprocess (plain or under torchrun). Environment:
  MGIQA_TEST_TEXT_REWARD=1   reward.mg_reward -> conftest.text_reward (an untrained model never
                             writes the answer layout, so the real reward would give no gradient)
  MGIQA_TEST_SAME_STREAM=1   every rank draws the same batches and rollouts (so a 2-rank run's
                             averaged gradient equals one process's)
  MGIQA_TEST_KILL_AFTER=N    SIGKILL this process right after checkpoint N is on disk
Each rank appends the images of every batch it draws to OUT/batches-rank{R}.jsonl and, at the end,
writes its full trainable weights to OUT/weights-rank{R}.safetensors."""
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import data  # noqa: E402
import distributed  # noqa: E402
import grpo  # noqa: E402
import reward  # noqa: E402

if os.environ.get("MGIQA_TEST_TEXT_REWARD"):
    from conftest import text_reward
    reward.mg_reward = text_reward
if os.environ.get("MGIQA_TEST_SAME_STREAM"):
    grpo.process_seed = lambda seed, rank: seed * 1000

out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else sys.argv[sys.argv.index("--resume") + 1]
sample = data.Sampler.sample


def logged_sample(self):
    batch = sample(self)
    with open(os.path.join(out, f"batches-rank{distributed.rank()}.jsonl"), "a") as f:
        f.write(json.dumps([os.path.basename(r.image) for r in batch["records"]]) + "\n")
    return batch


data.Sampler.sample = logged_sample
kill_after, save = int(os.environ.get("MGIQA_TEST_KILL_AFTER", "0")), grpo.save_checkpoint


def killing_save(run_dir, step, *args, **kwargs):
    path = save(run_dir, step, *args, **kwargs)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


grpo.save_checkpoint = killing_save
export = grpo.export


def dumping_export(policy, processor, final, cfg):
    from safetensors.torch import save_file
    model = distributed.unwrap(policy)
    if cfg.fsdp:
        state = distributed.full_state_dict(policy)
        state = {n: state[n] for n, p in model.named_parameters() if p.requires_grad} if distributed.rank() == 0 else None
    else:
        state = grpo.trainable_state(model)
    if state is not None:
        save_file({n: t.contiguous() for n, t in state.items()}, os.path.join(out, f"weights-rank{distributed.rank()}.safetensors"))
    return export(policy, processor, final, cfg)


grpo.export = dumping_export
sys.exit(grpo.main(sys.argv[1:]))
