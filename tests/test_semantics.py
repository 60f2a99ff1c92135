"""Exact semantics on analytic toy blocks, eager and compiled, against hand-computed values."""
import pytest
import torch

import bcc
from bcc import Schedule
from bcc.runtime.reference import HookReference

from testing import Toy, ToySkip, ToyTwoOut, ToyWiden

BACKENDS = ["eager", "inductor"]


def _steps(n, shape=(2, 3)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g), torch.tensor(float(100 - s))) for s in range(n)]


def _expected_toy(mask, steps, mode):
    """Hand-written semantics of Toy: b0 = 2x (no identity path: cached whole in both
    modes), b1 = x + 10 (residual 10 in residual mode)."""
    outs, cache0, cache1 = [], None, None
    for s, (x, t) in enumerate(steps):
        if mask[s, 0]:
            h = x * 2
            cache0 = h
        else:
            h = cache0
        if mask[s, 1]:
            h2 = h + 10
            cache1 = h2 - h if mode == "residual" else h2
        else:
            h2 = h + cache1 if mode == "residual" else cache1
        outs.append(h2 + t)
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["residual", "output"])
def test_toy_matches_hand_semantics(backend, mode):
    mask = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    sched = Schedule(mask, ["b0", "b1"])
    steps = _steps(5)
    model = bcc.compile(Toy(), sched, backend=backend, mode=mode)
    got = [model(x, t) for x, t in steps]
    want = _expected_toy(mask, steps, mode)
    for s, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0 if backend == "eager" else 1e-6, msg=f"step {s}")


@pytest.mark.parametrize("mode, reused", [("residual", 16.0), ("output", 12.0)])
def test_reuse_and_recompute_differ_exactly(mode, reused):
    # ToySkip's b0 = x + |x|: residual reuse is x_now + |x_then|, output reuse 2 |x_then|;
    # recompute is x_now + |x_now|.
    sched = Schedule(torch.tensor([[True, True], [False, True]]), ["b0", "b1"])
    model = bcc.compile(ToySkip(), sched, backend="eager", mode=mode)
    x0, x1 = torch.full((1,), 1.0), torch.full((1,), 5.0)
    t = torch.tensor(0.0)
    assert model(x0, t).item() == 12.0  # 1 + 1 + 10
    assert model(x1, t).item() == reused  # (5 + 1) + 10 or (1 + 1) + 10, not 5 + 5 + 10 = 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_without_identity_path_is_cached_whole_in_residual_mode(backend):
    # Toy's b0 = 2x: same shape as its input, but 2x is not x + something, so its
    # whole output is reused (the old shape rule replayed x_now + x_then).
    sched = Schedule(torch.tensor([[True, True], [False, True]]), ["b0", "b1"])
    model = bcc.compile(Toy(), sched, backend=backend)
    t = torch.tensor(0.0)
    model(torch.full((1,), 1.0), t)
    assert model(torch.full((1,), 5.0), t).item() == 12.0  # 2*1 + 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_changing_block_caches_whole_output(backend):
    sched = Schedule(torch.tensor([[True], [False], [True]]), ["b0"])
    model = bcc.compile(ToyWiden(), sched, backend=backend)
    steps = _steps(3)
    got = [model(x, t) for x, t in steps]
    x0 = steps[0][0]
    torch.testing.assert_close(got[1], (x0 * 4).sum(-1, keepdim=True) + steps[1][1])
    torch.testing.assert_close(got[2], (steps[2][0] * 4).sum(-1, keepdim=True) + steps[2][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ctx_width", [5, 3])  # 3: both streams of one shape
def test_two_output_block_pairs_residuals_by_stream(backend, ctx_width):
    sched = Schedule(torch.tensor([[True], [False]]), ["pair"])
    model = bcc.compile(ToyTwoOut(), sched, backend=backend)
    x0, c0 = torch.ones(2, 3), -torch.ones(2, ctx_width)
    x1, c1 = torch.full((2, 3), 4.0), torch.full((2, ctx_width), 7.0)
    t = torch.tensor(2.0)
    model(x0, c0, t)
    h, c = model(x1, c1, t)
    # h = a + 1 is x's stream (residual 1); c = b + 2|b| is ctx's (residual 2|c0| = 2),
    # whether or not the shapes tell them apart.
    torch.testing.assert_close(h, (x1 + 1) * t, rtol=0, atol=0)
    torch.testing.assert_close(c, c1 + 2, rtol=0, atol=0)


def test_reference_agrees_with_hand_semantics():
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.bool)
    steps = _steps(4)
    toy = Toy()
    ref = HookReference(toy, Schedule(mask, ["b0", "b1"]))
    got = [toy(x, t) for x, t in steps]
    ref.remove()
    for g, w in zip(got, _expected_toy(mask, steps, "residual")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # Removing the reference restores the plain model.
    torch.testing.assert_close(toy(*steps[1]), steps[1][0] * 2 + 10 + steps[1][1])


def test_second_trajectory_starts_fresh_without_reset():
    sched = Schedule(torch.tensor([[True, True], [False, False]]), ["b0", "b1"])
    model = bcc.compile(Toy(), sched, backend="eager")
    steps = _steps(2)
    first = [model(x, t) for x, t in steps]
    assert model.bcc_step == 0
    second = [model(x, t) for x, t in steps]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_schedule_swaps_without_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    names = ["b0", "b1"]
    model = bcc.compile(Toy(), Schedule.all_compute(3, names), backend=counter)
    steps = _steps(3)
    full = [model(x, t) for x, t in steps]
    lazy = Schedule(torch.tensor([[1, 1], [0, 0], [0, 0]], dtype=torch.bool), names)
    model.set_schedule(lazy)
    cached = [model(x, t) for x, t in steps]
    assert counter.frame_count == 1
    torch.testing.assert_close(cached, _expected_toy(lazy.mask, steps, "residual"))
    torch.testing.assert_close(full, _expected_toy(torch.ones(3, 2, dtype=torch.bool), steps, "residual"))
