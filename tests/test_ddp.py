"""Data-parallel compression on the engines' own data parallelism (2 processes on CPU, gloo): gblrc.compress
and `gblrc compress` under torchrun, and the user-loop API under `accelerate launch`, end with identical
structures on every rank and one output file."""

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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(script),
        str(tmp_path),
        str(ckpt),
    ]
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


LOOP = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    from accelerate import Accelerator, DistributedDataParallelKwargs
    import gblrc

    torch.set_num_threads(1)
    # the cool-down freezes the structure mid-run: DDP must allow parameters without gradients
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 48, generator=g)
    y = x[:, :5].argmax(1)
    cfg = gblrc.CompressConfig(budget=0.3, steps=12, lr=3e-3, training=gblrc.TrainingConfig(init_factor=1.5))
    model, ctrl = gblrc.prepare(model, cfg, data={"inputs": x, "targets": y})
    opt = torch.optim.AdamW(ctrl.param_groups())
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
    model, opt, dl = acc.prepare(model, opt, dl)
    step = 0
    while step < cfg.steps:
        for xb, yb in dl:
            loss = nn.functional.cross_entropy(model(xb), yb)
            acc.backward(loss)
            opt.step()
            ctrl.step(opt)
            opt.zero_grad()
            step += 1
            if step == cfg.steps:
                break
    rep = gblrc.finalize(model)  # the wrapped model is fine
    m = acc.unwrap_model(model)
    out = {"world": acc.num_processes, "ratio": rep["achieved_ratio"], "lambdas": [r["lambda"] for r in ctrl.history],
           "layers": {str(i): {"intervals": [t.tolist() for t in m[i].hard_intervals()],
                               "W": m[i].dense_weight().detach().flatten().tolist()} for i in (0, 2)}}
    json.dump(out, open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w"))
    if acc.is_main_process:
        gblrc.save(m, os.path.join(sys.argv[1], "model.gblr.pt"), example_inputs=x[:2])
""")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_accelerate_launch_user_loop_identical_structure_one_file(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    # on a machine without GPUs, --multi_gpu is accelerate's torchrun launcher; the processes run on the CPU (gloo)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        str(tmp_path),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == 2 == r1["world"]
    assert r0["layers"] == r1["layers"]  # the same structure and weights on both ranks, bit for bit
    assert r0["lambdas"] == r1["lambdas"] and any(v > 0 for v in r0["lambdas"])
    assert r0["ratio"] == r1["ratio"] and 0.28 <= r0["ratio"] <= 0.3
    assert sorted(f.name for f in tmp_path.iterdir() if f.suffix == ".pt") == ["model.gblr.pt"]


def test_torchrun_cli_compress_writes_one_output(tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 5))
    torch.save(model, tmp_path / "m.pt")
    x = torch.randn(128, 48, generator=torch.Generator().manual_seed(1))
    torch.save({"inputs": x, "targets": x[:, :5].argmax(1)}, tmp_path / "d.pt")
    main = tmp_path / "cli.py"
    main.write_text("from gblrc.cli import main\nmain()\n")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m.gblr.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        str(main),
        "compress",
        str(tmp_path / "m.pt"),
        "--budget",
        "0.3",
        "--data",
        str(tmp_path / "d.pt"),
        "--steps",
        "6",
        "--device",
        "auto",
        "-q",
        "-o",
        str(out),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in out.parent.iterdir()) == [
        "m.gblr.pt",
        "m.gblr.pt.report.json",
        "m.gblr.pt.structure.png",
    ]
    assert p.stdout.count("wrote ") == 1  # rank 0 only
    rep = json.loads(Path(f"{out}.report.json").read_text())
    assert rep["achieved_ratio"] <= 0.3 and rep["device"] == "cpu"
