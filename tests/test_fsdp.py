"""FSDP2 on a prepared model (issue 29): gblrc.fully_shard shards the rest, keeps the GBLR layers whole and
averages their gradients; two CPU processes (gloo) train, finalize and end with the same structure."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        import gblrc
        from torch.distributed.tensor import DTensor

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8))
        x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
        model, ctrl = gblrc.prepare(model, gblrc.CompressConfig(budget=0.5, steps=20, progress=False), data=x)
        gblrc.fully_shard(model)
        layers = [m for m in model.modules() if isinstance(m, gblrc.GBLRLinear)]
        kinds = {
            "gblr_whole": all(not isinstance(p, DTensor) for m in layers for p in m.parameters()),
            "head_sharded": isinstance(model[4].weight, DTensor),
        }
        opt = torch.optim.AdamW(ctrl.param_groups())
        losses = []
        for step in range(20):
            xb = x[rank::world][(step % 4) * 32 : (step % 4 + 1) * 32]  # each rank its own batches
            loss = ((model(xb) - xb[:, :8]) ** 2).mean()
            loss.backward()
            opt.step()
            ctrl.step(opt)
            opt.zero_grad()
            losses.append(float(loss))
        report = gblrc.finalize(model)
        structs = [m.structure().structure for m in model.modules() if isinstance(m, gblrc.GBLRLinear)]
        u = [m.U.detach().clone() for m in model.modules() if isinstance(m, gblrc.GBLRLinear)]
        got = [None] * world
        dist.all_gather_object(got, (structs, u))
        same = all(s == got[0][0] for s, _ in got) and all(
            all(torch.equal(a, b) for a, b in zip(us, got[0][1])) for _, us in got
        )
        out.put((rank, kinds, report["achieved_ratio"], same, losses[0], losses[-1]))
    except Exception as e:  # reported to the test, not lost in a child process
        out.put((rank, "error", f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_fully_shard_trains_and_finalizes_on_two_cpu_processes():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    rows = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for row in rows:
        assert row[1] != "error", row[2]
        rank, kinds, ratio, same, first, last = row
        assert kinds == {"gblr_whole": True, "head_sharded": True}
        assert ratio <= 0.5 + 1e-9
        assert same  # identical structures and content on both ranks
        assert last < first


def test_fully_shard_without_a_process_group_is_a_one_line_error():
    import gblrc

    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match="process group"):
        gblrc.fully_shard(model)
