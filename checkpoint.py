"""Checkpoints of a grpo.py run, written so that a resumed run equals an uninterrupted one on every rank.

    runs/x/checkpoint-STEP/
        adapter/                 LoRA runs: the adapter in PEFT's layout (lora.save_adapter)
        trainable.safetensors    --full without --fsdp: every trainable weight (fp32 master weights)
        sharded/                 --fsdp: model and optimizer shards, torch.distributed.checkpoint
        trainer_state.pt         step, optimizer (unsharded runs), lr schedule, config, world size
        rank-R.pt                rank R's sampler state and RNG states (python, numpy, torch CPU, CUDA)

A checkpoint is written under checkpoint-STEP.tmp and renamed by rank 0 once every rank has written
its part (barriers on both sides), so a crash mid-write leaves the previous checkpoint whole and the
partial one ignored. Everything is read back with map_location="cpu" (then copied onto each rank's
own device by load_state_dict) and weights_only=True: a checkpoint is data, never code.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import lora
import parallel


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (torch.cuda.set_device was called)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable weights on the CPU (an unsharded model)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoints(run_dir) -> list[int]:
    """Steps of the complete checkpoints in a run directory (partial *.tmp ones are ignored)."""
    return sorted(int(m.group(1)) for d in Path(run_dir).glob("checkpoint-*")
                  if (m := re.fullmatch(r"checkpoint-(\d+)", d.name)) and (d / "trainer_state.pt").is_file())


def save(run_dir, step, policy, optimizer, scheduler, sampler, cfg, keep=2) -> Path:
    """Every rank calls this; each writes its part, rank 0 the shared files and the rename."""
    from safetensors.torch import save_file

    rank, world = parallel.rank(), parallel.world_size()
    run_dir = Path(run_dir)
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    model = parallel.unwrap(policy)
    state = {"step": step, "scheduler": scheduler.state_dict(), "config": cfg, "world_size": world}
    if cfg["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(policy, optimizer)  # this rank's shards
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / "sharded"))
    elif rank == 0:  # DDP ranks hold identical weights and optimizer states
        state["optimizer"] = optimizer.state_dict()
        if cfg["full"]:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        else:
            lora.save_adapter(model, tmp / "adapter", cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["model"])
    torch.save({"sampler": sampler.state_dict(), "rng": rng_state()}, tmp / f"rank-{rank}.pt")
    if rank == 0:
        torch.save(state, tmp / "trainer_state.pt")
    parallel.barrier()  # every rank's files are on disk before the rename makes the checkpoint count
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(run_dir / f"checkpoint-{old}", ignore_errors=True)
    parallel.barrier()
    return final


def load(path, policy, optimizer, scheduler, sampler) -> int:
    """Restore a checkpoint written by save on the same world size; returns its step."""
    from safetensors.torch import load_file

    path, rank = Path(path), parallel.rank()
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != parallel.world_size():
        raise ValueError(f"{path}: written by {state['world_size']} processes, this run has {parallel.world_size()}; "
                         "resume with the same --nproc_per_node")
    own = path / f"rank-{rank}.pt"
    if not own.is_file():
        raise FileNotFoundError(f"{own}: missing, so rank {rank}'s sampler and RNG states cannot be restored")
    mine = torch.load(own, map_location="cpu", weights_only=True)
    model = parallel.unwrap(policy)
    if state["config"]["fsdp"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(policy, optimizer)
        shards = {"model": msd, "optimizer": osd}
        dcp.load(shards, checkpoint_id=str(path / "sharded"))
        set_state_dict(policy, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    else:
        if (path / "trainable.safetensors").is_file():
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in load_file(str(path / "trainable.safetensors")).items():
                    params[name].copy_(value)
        else:
            lora.load_adapter_weights(model, path / "adapter")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(mine["sampler"])
    set_rng_state(mine["rng"])
    return int(state["step"])


def export(policy, processor, out, cfg) -> Path | None:
    """The end of a run, in `out`: a plain transformers checkpoint of all weights (--full; gathered
    onto rank 0 under --fsdp) or the LoRA adapter. Decoding settings are not saved with it: its
    generation config holds only the special-token ids (mgiqa.plain_generation_config)."""
    import mgiqa

    out = Path(out)
    model = parallel.unwrap(policy)
    if not cfg["full"]:
        if parallel.rank() == 0:
            lora.save_adapter(model, out, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["model"])
        parallel.barrier()
        return out
    state = parallel.full_state_dict(policy) if cfg["fsdp"] else None  # a collective: every rank calls it
    if parallel.rank() == 0:
        model.generation_config = mgiqa.plain_generation_config(model)
        model.save_pretrained(out, state_dict=state)
        processor.save_pretrained(out)
    parallel.barrier()
    return out


def save_merged(model, processor, out) -> None:
    """LoRA folded in (fp32 sum, cast once): a plain transformers checkpoint that mgiqa.load and
    from_pretrained open, with a clean generation config and the processor files."""
    import mgiqa

    lora.merge_lora(model)
    model.generation_config = mgiqa.plain_generation_config(model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
