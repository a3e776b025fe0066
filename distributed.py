"""Several processes for grpo.py (torchrun): the process group, and the wrapping of rollouts.Policy:
DDP for LoRA (adapters are small), FSDP2 for full fine-tuning.

    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --full --fsdp --data ...

FSDP2 (`torch.distributed.fsdp.fully_shard`): each vision block and decoder layer is its own unit,
the rest (embeddings, LM head, merger, norms) the root's; the master weights stay fp32 and sharded,
compute runs in `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, AdamW steps the shards.
Plain DDP would hold ~16 bytes a parameter on every GPU (fp32 weights, gradients, two Adam states):
~133 GB for Qwen2.5-VL-7B, more than an 80 GB GPU; sharded over 8 GPUs it is ~17 GB each.
The training forward is `Policy.forward` (per-token log-probs), so DDP's gradient hooks and FSDP2's
all-gathers fire on it; `Policy.sample` is registered with FSDP2 as a second forward method, and runs
inside `gathered`, which holds every unit's full weights from the first generated token to the last.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from rollouts import Policy

PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)  # rank 0 gathering and writing a 7B checkpoint, or evaluating


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init(fsdp: bool = False) -> str | None:
    """Join the torchrun process group when WORLD_SIZE > 1 (or for FSDP, also with one process);
    returns this rank's device, or None when there is no process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not fsdp:
        return None
    if is_distributed():
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        raise SystemExit("error: --fsdp runs under torchrun (torchrun --nproc_per_node N grpo.py ...; N may be 1)")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if not cuda:
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def policy_of(wrapped) -> Policy:
    """The Policy inside DDP(Policy), or the Policy itself (an FSDP-sharded Policy is still a Policy)."""
    while not isinstance(wrapped, Policy):
        wrapped = wrapped.module
    return wrapped


def unwrap(wrapped) -> nn.Module:
    """The transformers model inside a Policy, DDP(Policy) or an FSDP-sharded Policy."""
    return policy_of(wrapped).model


def wrap(model, fsdp: bool, compute_dtype: torch.dtype, shared_prefix: bool = True) -> nn.Module:
    """Policy(model), under DDP or FSDP2 when running distributed (or with fsdp on one process)."""
    policy = Policy(model, shared_prefix)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
            fully_shard(block, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
        register_fsdp_forward_method(policy, "sample")  # sampling gathers the root's weights as forward does
        return policy
    if is_distributed() and any(p.requires_grad for p in model.parameters()):
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    return policy


def no_sync(policy, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but the last."""
    if last or not hasattr(policy, "no_sync"):
        return contextlib.nullcontext()
    return policy.no_sync()


def for_inference(policy) -> nn.Module:
    """What no-grad log-prob calls (reference, old policy) go through: the Policy itself under DDP
    (DDP's own forward would broadcast buffers and expect a backward); FSDP needs its hooks."""
    return policy.module if hasattr(policy, "no_sync") else policy


def full_state_dict(policy) -> dict[str, torch.Tensor]:
    """All weights gathered onto rank 0's CPU under their transformers names (a collective: every
    rank calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


@contextlib.contextmanager
def gathered(policy):
    """FSDP2: every unit's full weights gathered once for a whole rollout (Policy.sample, registered as
    a forward method in wrap), not once per generated token; afterwards each unit gets back
    fully_shard's default (reshard after forward, except the root). A no-op without FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not policy, recurse=False)
