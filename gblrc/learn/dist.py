"""Data parallelism for compression under ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1): the
process group from the launcher's environment, torch's DistributedDataParallel for the gradients, and
parameters broadcast from rank 0 at the end, so every rank ends with the identical structure."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "setup",
    "rank_world",
    "data_parallel",
    "broadcast_module",
    "allreduce_mean",
    "barrier",
    "broadcast_object",
    "fully_shard",
]


def setup(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched with WORLD_SIZE > 1 (torchrun, accelerate launch), unless
    the launcher's code already did; (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped in torch's DistributedDataParallel (gradients averaged over the ranks in the
    backward pass), on this rank's device.  Parameters that get no gradient in a step (e.g. a frozen
    structure) are allowed."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, world: int) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if world <= 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def allreduce_mean(x: float, world: int, device=None) -> float:
    if world <= 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def broadcast_object(obj, world: int):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fully_shard(model: torch.nn.Module, **fsdp_kwargs) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) for a model from :func:`gblrc.prepare`, with its GBLR
    layers kept whole: every other parameter is sharded across the ranks as FSDP does it, the GBLR layers'
    (content, widths, locations) are left out of the sharding (``ignored_params``) and their gradients are
    averaged over the ranks as each one is accumulated.  The controller reads and trims whole widths
    (the proximal step, the cool-down's fit to the budget), which it cannot do on shards: sharded, the
    training steps run but the fit fails on a mix of DTensors and tensors.  The GBLR layers are a fraction
    of the dense layers' size (the budget), so keeping them whole costs that fraction on every rank.
    Call it after ``prepare`` and before building the optimiser; ``fsdp_kwargs`` go to fully_shard."""
    try:
        from torch.distributed.fsdp import fully_shard as _fully_shard
    except ImportError:
        raise ValueError(
            f"this torch ({torch.__version__}) has no torch.distributed.fsdp.fully_shard (FSDP2); "
            "use DistributedDataParallel"
        ) from None
    from gblrc.nn.layer import GBLRLinear

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fully_shard needs a process group: launch with torchrun (or init_process_group first)")
    keep = [p for m in model.modules() if isinstance(m, GBLRLinear) for p in m.parameters()]
    if not keep:
        raise ValueError("fully_shard: the model has no GBLR layer; call gblrc.prepare(model, ...) first")
    world = dist.get_world_size()

    def average(p):
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in keep:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average)
    ignored = set(fsdp_kwargs.pop("ignored_params", ())) | set(keep)
    return _fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
