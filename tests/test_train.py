"""Trainer pieces: proximal step, lambda controller, sigma schedule, budget fit, compaction, data, losses."""

import pytest
import torch
from torch import nn

from gblrc.learn.budget import LambdaController, compact, cost_ratio, fit_to_budget, proximal_step
from gblrc.learn.data import batch_stream, split_batch
from gblrc.nn.layer import GBLRLinear
from gblrc.learn.objective import Objective, task_loss
from gblrc.learn.config import CompressConfig
from gblrc.learn.train import Schedule


def layer(n_in=40, n_out=24, K=12, seed=0):
    torch.manual_seed(seed)
    m = GBLRLinear(n_in, n_out, num_components=K)
    g = torch.Generator().manual_seed(seed)
    m.set_intervals(
        torch.randint(1, n_in + 1, (K,), generator=g).tolist(),
        torch.randint(0, n_in, (K,), generator=g).tolist(),
        torch.randint(1, n_out + 1, (K,), generator=g).tolist(),
        torch.randint(0, n_out, (K,), generator=g).tolist(),
    )
    return m.eval()


def test_proximal_step_shrinks_clamps_and_wraps():
    m = layer()
    with torch.no_grad():
        m.widths.copy_(torch.tensor([[0.5, 0.01, 1.2] + [0.3] * 9, [0.2] * 12]))
        m.locations.copy_(torch.tensor([[1.25, -0.25] + [0.0] * 10, [0.5] * 12]))
    proximal_step([m], 0.05)
    assert torch.allclose(m.widths[0, :3], torch.tensor([0.45, 0.0, 1.0]))
    assert torch.allclose(m.widths[1], torch.full((12,), 0.15))
    assert torch.allclose(m.locations[0, :2], torch.tensor([0.25, 0.75]))


def test_lambda_controller_rises_above_reference_and_drops_to_zero_below():
    c = LambdaController(budget=0.4, start_ratio=0.6, reach=10, lam0=1.0, growth=2.0)
    assert (
        c.reference(0) == pytest.approx(0.6)
        and c.reference(5) == pytest.approx(0.5)
        and c.reference(99) == pytest.approx(0.4)
    )
    assert c.update(5, 0.55) == 1.0 and c.update(6, 0.55) == 2.0 and c.update(7, 0.55) == 4.0
    assert c.update(8, 0.3) == 0.0
    assert c.update(20, 0.41) == 1.0


def test_sigma_schedule():
    cfg = Schedule.of(CompressConfig(budget=0.5, steps=100).replace(warmup=0.1, cooldown=0.2, sigma_max=100.0))
    assert cfg.warm_end == 10 and cfg.cool_start == 80
    assert cfg.sigma(0) == 1.0 and cfg.sigma(9) == 1.0
    assert 1.0 < cfg.sigma(40) < 100.0 and cfg.sigma(79) == pytest.approx(100.0)
    s = [cfg.sigma(i) for i in range(80)]
    assert all(a <= b for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6])
def test_fit_to_budget_over_and_under(budget):
    ms = [layer(seed=s) for s in range(3)] + [layer(64, 32, 20, seed=7)]
    fit_to_budget(ms, budget)
    dense = sum(m.dense_flops() for m in ms)
    r = cost_ratio(ms)
    assert r <= budget and r >= budget - 0.02, r
    assert sum(m.flops() for m in ms) <= int(budget * dense)


def test_fit_to_budget_removes_least_useful_components_first():
    m = GBLRLinear(32, 32, num_components=4).eval()
    m.set_intervals([32] * 4, [0] * 4, [32] * 4, [0] * 4)
    with torch.no_grad():
        m.U.mul_(torch.tensor([10.0, 0.01, 5.0, 3.0])[:, None, None])
    fit_to_budget([m], 3 * 64 / 1024)  # room for 3 of the 4 components
    wc, _, wr, _ = m.hard_intervals()
    assert wc.tolist() == [32, 0, 32, 32]


def test_compact_keeps_function_and_drops_dead_components():
    m = layer()
    with torch.no_grad():
        m.widths[:, 3] = 0.0
        m.widths[0, 5] = 0.01  # under one element: dead
    c = compact(m)
    assert c.num_components == 10 and c.flops() == m.flops()
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x))


def test_batch_stream_deterministic_shuffled_and_resumable():
    x = torch.arange(10).float()[:, None]
    a = [b[0].flatten().tolist() for _, b in zip(range(7), batch_stream(x, 4, seed=1))]
    b = [b[0].flatten().tolist() for _, b in zip(range(7), batch_stream(x, 4, seed=1))]
    assert a == b and sorted(sum(a[:3], [])) == list(range(10))  # one epoch covers every row once
    resumed = [b[0].flatten().tolist() for _, b in zip(range(4), batch_stream(x, 4, seed=1, start=3))]
    assert resumed == a[3:]
    assert a != [b[0].flatten().tolist() for _, b in zip(range(7), batch_stream(x, 4, seed=2))]


def test_batch_stream_forms_and_sharding():
    gen = (torch.full((2, 3), float(i)) for i in range(3))  # one-shot iterator: cycled from a cache
    got = [b[0][0, 0].item() for _, b in zip(range(5), batch_stream(gen, 8, 0))]
    assert got == [0, 1, 2, 0, 1]
    calls = []
    fn = lambda: (calls.append(1), [(torch.zeros(2, 3), torch.ones(2).long())])[1]  # noqa: E731
    xs, ys = next(batch_stream(fn, 8, 0))
    assert ys.tolist() == [1, 1]
    kw = [{"input_ids": torch.arange(6).view(3, 2), "labels": torch.arange(3)}]
    ((x, y),) = [b for _, b in zip(range(1), batch_stream(kw, 8, 0))]
    assert set(x) == {"input_ids"} and y.tolist() == [0, 1, 2]
    x0, y0 = split_batch((x, y), 0, 2)
    x1, y1 = split_batch((x, y), 1, 2)
    assert y0.tolist() == [0, 2] and y1.tolist() == [1] and x1["input_ids"].tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="targets"):
        next(batch_stream({"inputs": torch.zeros(4, 2), "targets": torch.zeros(3)}, 2, 0))
    with pytest.raises(ValueError, match="no batches"):
        next(batch_stream([], 2, 0))


def test_losses():
    out = torch.randn(4, 3)
    assert task_loss(out, torch.tensor([0, 1, 2, 0])) > 0
    torch.testing.assert_close(task_loss(out, out.clone()), torch.tensor(0.0))
    with pytest.raises(ValueError, match="do not fit"):
        task_loss(out, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not fit"):
        task_loss(out, torch.zeros(4, 5))
    student = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    teacher.load_state_dict(student.state_dict())
    obj = Objective(student, teacher, ["0"], layer_weight=1.0)
    x = torch.randn(5, 8)
    assert obj(x, None).item() == pytest.approx(0.0, abs=1e-12)  # identical models: zero distillation loss
    with torch.no_grad():
        student[0].weight.add_(0.1)
    assert obj(x, None).item() > 0
    obj.close()
    assert not student[0]._forward_hooks


def test_generator_data_is_replayed_from_the_start():
    from gblrc.learn.data import replayable

    gen = (torch.full((1, 2), float(i)) for i in range(4))
    data = replayable(gen)
    first = next(batch_stream(data, 8, 0))[0][0, 0].item()
    again = [b[0][0, 0].item() for _, b in zip(range(6), batch_stream(data, 8, 0))]
    assert first == 0 and again == [0, 1, 2, 3, 0, 1]


def test_schedule_reads_every_setting_from_the_config_and_copies_none():
    import dataclasses

    from gblrc.learn.config import result_settings

    assert [f.name for f in dataclasses.fields(Schedule)] == ["config", "steps", "budget", "fit_budget"]
    cfg = CompressConfig(budget=0.3, steps=40, lr=2e-3, structure="lowrank").replace(warmup=0.25, sigma_max=7.0)
    s = Schedule.of(cfg, steps=20)
    assert (s.steps, s.budget, s.lr, s.warmup, s.sigma_max, s.lr_struct) == (20, 0.3, 2e-3, 0.25, 7.0, 1e-2)
    assert not s.learn_structure and s.cool_start == 0
    sig = s.signature()
    assert sig == {**result_settings(cfg), "steps": 20, "budget": 0.3, "fit_budget": None}
    with pytest.raises(AttributeError, match="no setting 'nope'"):
        s.nope
