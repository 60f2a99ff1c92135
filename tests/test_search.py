"""The schedule search and the measured cost model: analytic toys, an independent
reference for the score, hypothesis for refresh steps and frontiers, and bad input."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bcc
from bcc import BccError, ChangeProfile, CostModel, ErrorCode, Schedule, search_schedule
from bcc.plan.search import Candidate, frontier, refresh_steps

T = 6


class Toy(torch.nn.Module):
    """``still`` reads only a constant, so reusing it is exact; ``moving`` reads the latent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.moving = torch.nn.Linear(3, 3)
        self.still = torch.nn.Linear(3, 3)
        self.register_buffer("const", torch.randn(1, 3))

    def forward(self, x, t):
        return self.moving(x) * t + self.still(self.const)


def sample(model, seed):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
    for s in range(T):
        x = x - 0.2 * model(x, torch.tensor(1.0 - s / T))
    return x


def psnr(got, ref):
    """Written here, apart from bcc's scorer: mean per-sample PSNR over the reference's range, capped at 100."""
    peak = float(ref.max() - ref.min())
    out = []
    for g, r in zip(got, ref):
        mse = float(((g - r) ** 2).mean())
        out.append(100.0 if mse == 0 else min(100.0, 10 * math.log10(peak ** 2 / mse)))
    return sum(out) / len(out)


def by_hand(model, mask, names, seed):
    """The schedule applied by forward wrappers: a reused block returns its last computed output."""
    cache, step = {}, [0]
    originals = {n: getattr(model, n).forward for n in names}

    def wrap(i, name):
        def forward(*args):
            if bool(mask[step[0], i]):
                cache[name] = originals[name](*args)
            return cache[name]
        return forward

    class Counting(torch.nn.Module):
        def forward(self, x, t):
            out = model(x, t)
            step[0] += 1
            return out

    for i, n in enumerate(names):
        getattr(model, n).forward = wrap(i, n)
    try:
        return sample(Counting(), seed)
    finally:
        for n in names:
            getattr(model, n).forward = originals[n]


@pytest.fixture(scope="module")
def toy():
    net = Toy().eval()
    names = ["moving", "still"]
    with torch.no_grad():
        profile = bcc.calibrate(net, lambda m, c, seed: sample(m, seed), [0], seeds=[50], blocks=names, progress=False)
    return net, names, profile


def test_search_reuses_the_block_whose_reuse_is_exact(toy):
    net, names, profile = toy
    fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")
    equal = CostModel(tuple(names), (1.0, 1.0), 0.0)  # caching `still` alone fits 0.6: (6 + 1) / 12
    with torch.no_grad():
        found = search_schedule(fast, sample, profile, 0.6, cost=equal, seeds=[1, 2], progress=False)
    mask = found.schedule.mask
    assert found.chosen.fraction <= 0.6
    assert not mask[1:, names.index("still")].any()  # still: computed once, reused exactly
    assert found.chosen.psnr_db == 100.0
    assert found.schedule.meta["search"]["family"] == found.chosen.family
    assert json.loads(json.dumps(found.to_dict()))["chosen"]["psnr_db"] == 100.0


def test_reported_score_equals_an_independent_reference(toy):
    """A budget where every schedule errs: the chosen score is what forward wrappers give."""
    net, names, profile = toy
    fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")
    with torch.no_grad():
        found = search_schedule(fast, sample, profile, 0.4, seeds=[3], progress=False)
        assert found.chosen.psnr_db < 100.0
        got = by_hand(net, found.schedule.mask, names, 3)
        want = sample(net, 3)
    assert found.chosen.fraction <= 0.4
    assert found.chosen.psnr_db == pytest.approx(psnr(got, want), abs=1e-3)
    # The search never reports a candidate better than the one it chose within the budget.
    assert all(c.psnr_db <= found.chosen.psnr_db + 1e-9 for c in found.tried if c.fraction <= 0.4)
    assert fast.bcc_schedule.mask.all()  # the caller's schedule is put back


def test_measured_cost_model_recovers_a_known_linear_cost(toy):
    """A clock that advances by a known cost per block-step: the fit gets the costs back exactly."""
    net, names, _ = toy
    flops = (1.0, 3.0)
    profile = ChangeProfile(torch.zeros(T, 2), names, block_flops=flops, rest_flops=0.0)
    alpha, beta, rest = 2.0, 0.5, 1.0
    now = [0.0]
    fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")

    def run(model):
        n = model.bcc_schedule.mask.double().sum(0)
        now[0] += T * rest + float((n * (alpha * torch.tensor(flops) + beta)).sum())

    cost = CostModel.measure(fast, run, profile, repeats=2, clock=lambda: now[0])
    assert cost.source == "measured"
    torch.testing.assert_close(torch.tensor(cost.block_costs), alpha * torch.tensor(flops) + beta)
    assert cost.rest_cost == pytest.approx(rest)
    assert cost.meta["fit_max_rel_error"] < 1e-9
    assert cost.fraction(Schedule.all_compute(T, names).mask) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(curve=st.lists(st.floats(0, 5), min_size=1, max_size=30), m=st.integers(1, 40))
def test_refresh_steps_are_distinct_in_range_and_start_at_zero(curve, m):
    steps = refresh_steps(torch.tensor(curve), m)
    assert steps[0] == 0 and steps == sorted(set(steps))
    assert len(steps) == min(m, len(curve)) and all(0 <= s < len(curve) for s in steps)


@settings(max_examples=60, deadline=None)
@given(points=st.lists(st.tuples(st.floats(0.01, 1), st.floats(0, 100)), min_size=1, max_size=20))
def test_no_frontier_point_is_dominated(points):
    s = Schedule.all_compute(1, ["a"])
    cands = [Candidate("x", s, f, p) for f, p in points]
    front = frontier(cands)
    for c in front:
        assert not any(o.fraction <= c.fraction and o.psnr_db > c.psnr_db for o in cands)
    assert max(c.psnr_db for c in cands) == front[-1].psnr_db


def test_bad_input_says_what_to_do(toy):
    net, names, profile = toy
    fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")
    with pytest.raises(BccError) as e:
        search_schedule(fast, sample, profile, 0.0, progress=False)
    assert e.value.code is ErrorCode.BUDGET_UNREACHABLE
    with pytest.raises(BccError) as e:
        search_schedule(fast, sample, profile, 0.5, families=("deepcache",), progress=False)
    assert e.value.code is ErrorCode.CONFIG_INVALID and "block" in str(e.value)
    other = CostModel(("x", "y"), (1.0, 1.0), 0.0)
    with pytest.raises(BccError) as e:
        search_schedule(fast, sample, profile, 0.5, cost=other, progress=False)
    assert e.value.code is ErrorCode.PROFILE_MISMATCH
    with pytest.raises(BccError) as e:
        CostModel(("a",), (-1.0,), 0.0)
    assert e.value.code is ErrorCode.CALIBRATION_INVALID


class Chain(torch.nn.Module):
    """``b`` reads only ``a``: the region "a..b" is both, cached whole."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, x, t):
        return self.b(torch.tanh(self.a(x)) * t)


def test_region_family_scores_the_region_on_its_own_model():
    net, names = Chain().eval(), ["a", "b"]
    with torch.no_grad():
        profile = bcc.calibrate(net, lambda m, c, seed: sample(m, seed), [0], seeds=[50], blocks=names,
                                progress=False)
        fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")
        found = search_schedule(fast, sample, profile, 0.5, cost=CostModel(tuple(names), (1.0, 1.0), 0.0),
                                families=("region",), seeds=[4], progress=False)
        assert found.chosen.family.endswith("region a..b") and found.schedule.block_names == ("a..b",)
        assert found.chosen.fraction <= 0.5 and found.chosen.psnr_db < 100.0
        # It runs on a model compiled for the region, with the chosen schedule set; the
        # caller's model keeps its schedule.
        assert found.denoiser is not fast and found.denoiser.bcc_schedule == found.schedule
        assert fast.bcc_schedule.block_names == ("a", "b") and fast.bcc_schedule.mask.all()
        # Reusing the region is reusing b's whole output (a is read only by b): by hand.
        got = by_hand(net, found.schedule.mask, ["b"], 4)
        assert found.chosen.psnr_db == pytest.approx(psnr(got, sample(net, 4)), abs=1e-3)


def test_a_region_the_graph_refuses_is_skipped(toy):
    net, names, profile = toy  # `still` does not depend on `moving`: "moving..still" is no region
    fast = bcc.compile(net, Schedule.all_compute(T, names), backend="eager")
    with torch.no_grad():
        found = search_schedule(fast, sample, profile, 0.7, seeds=[1], regions=["moving..still"], progress=False)
    assert not any("region" in c.family for c in found.tried) and found.denoiser is fast
