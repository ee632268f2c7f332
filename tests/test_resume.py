"""A `gblrc compress` run killed with SIGKILL after its first checkpoint completes with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import gblrc

CLI = [sys.executable, "-c", "from gblrc.cli import main; main()", "compress"]


def _ckpt_files(d):  # finished checkpoint files (the trainer writes *.tmp<pid> first, then renames)
    return [p for p in d.rglob("*") if p.is_file() and ".tmp" not in p.name] if d.is_dir() else []


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_kill_9_then_resume_completes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(512, 32)
    torch.save(model.eval(), tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")  # no targets: distillation from the dense model
    out, ckpt = tmp_path / "m.gblr.pt", tmp_path / "m.gblr.pt.ckpt"
    args = [
        str(tmp_path / "m.pt"),
        "--budget",
        "0.4",
        "--data",
        str(tmp_path / "x.pt"),
        "--steps",
        "300",
        "--batch-size",
        "16",
        "--checkpoint-every",
        "5",
        "-o",
        str(out),
        "-q",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # tiny model: threads only spin
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 45
        while not _ckpt_files(ckpt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.stdout.read().decode()[-2000:]
        assert _ckpt_files(ckpt), "no checkpoint appeared within 45 s"
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave an output file"
    assert _ckpt_files(ckpt)

    # without --resume the stale checkpoint is not silently overwritten
    r = subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "--resume" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr

    r = subprocess.run(CLI + args + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not ckpt.exists(), "the checkpoint folder is removed after success"
    rep = json.loads((tmp_path / "m.gblr.pt.report.json").read_text())
    assert rep["settings"]["resumed"] is True
    assert rep["achieved_ratio"] <= 0.4
    m = gblrc.load(out)
    y = m(*m.gblrc_example_inputs.values())
    assert y.shape == (2, 8) and torch.isfinite(y).all()

    # the resumed run ends where an uninterrupted run with the same settings ends
    out2 = tmp_path / "ref.gblr.pt"
    r = subprocess.run(CLI + args[:-3] + ["-o", str(out2), "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = json.loads((tmp_path / "ref.gblr.pt.report.json").read_text())
    assert len(rep["loss_curve"]) == len(ref["loss_curve"])
    assert [row[0] for row in rep["loss_curve"]] == [row[0] for row in ref["loss_curve"]]
    torch.testing.assert_close(torch.tensor(rep["loss_curve"]), torch.tensor(ref["loss_curve"]), rtol=1e-5, atol=1e-6)
    assert rep["gblr_cost"] == ref["gblr_cost"]
    torch.testing.assert_close(y, gblrc.load(out2)(*m.gblrc_example_inputs.values()), rtol=1e-4, atol=1e-5)
