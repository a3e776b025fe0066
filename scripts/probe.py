"""The demo's perception stage alone: data, high-pass filters, the family probe; then its held-out confusion.

    python scripts/probe.py --seed 0 --source photos          # the photographs' crops
    MGIQA_DEMO='{"probe_vision_lr": 1e-4}' python scripts/probe.py   # procedural (demo.py's default source)

On photographs the probe is the demo's bottleneck: what it can tell apart on photos it never saw caps
what GRPO can teach (docs/DEMO_NOTES.md). This runs in about 80 s on two cores instead of the demo's
five minutes, so a change to the data, the filters or the probe can be judged here first. Prints the
probe's log (training loss, held-out family accuracy) and the held-out confusion matrix: rows the
true family, columns the predicted one, in demo.WORDS order. MGIQA_DEMO overrides DemoConfig fields
as for demo.py.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import demo  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the data draw (default 0)")
    ap.add_argument("--source", choices=("photos", "procedural"), default=demo.DemoConfig.source,
                    help=f"scenes, as demo.py's --source (default {demo.DemoConfig.source})")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    cfg = demo.config(args)
    torch.set_num_threads(args.threads)
    model, _, data = demo.untrained(cfg)
    demo.train_probe(model, data, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
