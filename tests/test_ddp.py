"""Data-parallel compression: a 2-process torchrun on CPU (gloo) ends with identical structures."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    import gblrc

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 48, generator=g)
    y = x[:, :5].argmax(1)
    m, rep = gblrc.compress(model, 0.3, data={"inputs": x, "targets": y}, steps=12, batch_size=32,
                            lr=3e-3, progress=False, checkpoint_dir=sys.argv[2], checkpoint_every=5)
    out = {"ratio": rep["achieved_ratio"], "curve": rep["loss_curve"], "world": torch.distributed.get_world_size(),
           "layers": {}}
    for i in (0, 2):
        wc, lc, wr, lr = (t.tolist() for t in m[i].hard_intervals())
        out["layers"][str(i)] = {"intervals": [wc, lc, wr, lr], "U": m[i].U.detach().flatten().tolist(),
                                 "V": m[i].V.detach().flatten().tolist()}
    json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_identical_structure(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), str(tmp_path), str(ckpt)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2 == r1["world"]
    assert r0["layers"] == r1["layers"]  # same structure and the same factors, bit for bit
    assert r0["curve"] == r1["curve"]  # same (all-reduced) losses, cost ratios and lambdas every step
    assert r0["ratio"] == r1["ratio"] and 0.28 <= r0["ratio"] <= 0.3
    assert len(r0["curve"]) == 12
    assert (ckpt / "checkpoint.pt").exists()  # written by rank 0 only (a single file)
    assert not list(ckpt.glob("*.tmp*"))
