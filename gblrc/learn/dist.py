"""Data parallelism for compression under ``torchrun`` (WORLD_SIZE > 1): gradients are all-reduced by
hand (one flat buffer), parameters broadcast from rank 0, so every rank takes identical steps and ends
with the identical structure."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["setup", "rank_world", "allreduce_grads", "broadcast_module", "allreduce_mean", "barrier"]


def setup(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun with WORLD_SIZE > 1; (rank, world)."""
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


def allreduce_grads(params, world: int) -> None:
    """Average the gradients of ``params`` over ranks (missing gradients count as zero)."""
    if world <= 1:
        return
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p in params:
        n = p.numel()
        g = flat[i:i + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        i += n


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
