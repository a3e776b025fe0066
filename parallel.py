"""Several processes for grpo.py (torchrun): the process group, the one module the trainer calls the
policy through, and its wrapping: DDP for LoRA (adapters are small), FSDP2 for full fine-tuning.

    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --full --fsdp --data ...

FSDP2 (`torch.distributed.fsdp.fully_shard`): each vision block and decoder layer is its own unit,
the rest (embeddings, LM head, merger, norms) the root's; the master weights stay fp32 and sharded,
compute runs in `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, AdamW steps the shards.
Plain DDP would hold ~16 bytes a parameter on every GPU (fp32 weights, gradients, two Adam states):
~133 GB for Qwen2.5-VL-7B, more than an 80 GB GPU; sharded over 8 GPUs it is ~17 GB each.
The trainer calls the model only through `Policy.forward` (rollouts, log-probs), so the hooks of
DDP (gradient sync) and FSDP2 (all-gather of shards) fire however many submodules a step calls.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import rollouts

PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)  # rank 0 gathering and writing a 7B checkpoint, or evaluating


class Policy(nn.Module):
    """forward("rollout", ...) = rollouts.rollout; forward("logprobs", ...) = rollouts.completion_logprobs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, task: str, *args, **kwargs):
        if task == "logprobs":
            return rollouts.completion_logprobs(self.model, *args, **kwargs)
        if task == "rollout":
            return rollouts.rollout(self.model, *args, **kwargs)
        raise ValueError(f"Policy.forward: unknown task {task!r} (rollout, logprobs)")


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


def unwrap(policy) -> nn.Module:
    """The transformers model inside a Policy, DDP(Policy) or an FSDP-sharded Policy."""
    while not isinstance(policy, Policy):  # an FSDP-sharded Policy is still a Policy (a subclass)
        policy = policy.module
    return policy.model


def wrap(model, fsdp: bool, compute_dtype: torch.dtype) -> nn.Module:
    """Policy(model), under DDP or FSDP2 when running distributed (or with fsdp on one process)."""
    policy = Policy(model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
            fully_shard(block, mp_policy=mp)
        fully_shard(policy, mp_policy=mp)
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
    """What no-grad calls (rollouts, reference and old log-probs) go through: DDP's own forward
    would broadcast buffers and expect a backward; FSDP needs its hooks to gather the shards."""
    return policy.module if hasattr(policy, "no_sync") else policy


def full_state_dict(policy) -> dict[str, torch.Tensor]:
    """All weights gathered onto rank 0's CPU under their transformers names (a collective: every
    rank calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


@contextlib.contextmanager
def gathered_for_generation(policy):
    """FSDP: keep each unit's weights gathered from the first decoding step to the last (one
    all-gather per rollout, not one per generated token); a no-op without FSDP units. Afterwards
    each unit gets back fully_shard's default: reshard after forward, except the root."""
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
