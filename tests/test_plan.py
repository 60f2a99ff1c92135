"""Eq. 7 schedules on hand-made profiles, budgets, costs, files and bad input."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bcc
from bcc import BccError, ChangeProfile, ErrorCode, Schedule
from bcc.plan.budget import resample_profile
from bcc.plan.planner import PlannedMask, compute_fraction, plan_for_budget, plan_from_change

from_change, for_budget = Schedule.from_change, Schedule.for_budget


def _profile(cols, flops=None, rest=0.0):
    l1 = torch.tensor(cols, dtype=torch.float64).T  # cols: one list of per-step changes per block
    names = [f"b{i}" for i in range(l1.shape[1])]
    return ChangeProfile(l1, names, block_flops=flops, rest_flops=rest)


def test_eq7_exact_schedules():
    p = _profile([
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # never changes: never refreshed
        [0.0, 0.9, 0.9, 0.9, 0.9, 0.9],  # changes more than δ each step: every step
        [0.0, 0.2, 0.2, 0.2, 0.2, 0.2],  # refresh when the sum since the last passes 0.5
        [0.0, 0.1, 0.6, 0.05, 0.05, 0.6],
    ])
    s = from_change(p, 0.5)
    assert s.mask.T.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 0, 1, 0, 0],  # 0.2+0.2+0.2 = 0.6 > 0.5 at step 3, then 0.4 by step 5
        [1, 0, 1, 0, 0, 1],
    ]
    assert s.meta["threshold"] == 0.5 and s.meta["sum_from"] == "next"


def test_eq7_literal_reading_counts_the_change_into_t_a():
    p = _profile([[0.0, 0.2, 0.2, 0.2, 0.2, 0.2]])
    assert from_change(p, 0.5).mask[:, 0].int().tolist() == [1, 0, 0, 1, 0, 0]
    # literal: after refreshing at 3 the sum restarts with L1(3) = 0.2, so step 5 refreshes.
    assert from_change(p, 0.5, sum_from="literal").mask[:, 0].int().tolist() == [1, 0, 0, 1, 0, 1]


def test_threshold_zero_is_all_compute_when_everything_changes():
    p = _profile([[0.0, 0.1, 0.3, 0.01], [0.0, 0.5, 0.5, 0.5]])
    assert from_change(p, 0.0).mask.all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=12), st.floats(0.0, 2.0))
def test_higher_threshold_never_computes_more(col, delta):
    p = _profile([[0.0] + col])
    a = from_change(p, delta).mask.sum()
    b = from_change(p, delta + 0.25).mask.sum()
    assert b <= a


def test_costs_weigh_the_compute_fraction():
    p = _profile([[0.0, 0.9, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]], flops=[3.0, 1.0], rest=4.0)
    s = from_change(p, 0.5)
    # block0 every step (3*4), block1 once (1), rest 4 per step (16): 29 / 32.
    assert s.compute_fraction() == pytest.approx(29 / 32)
    assert s.ideal_speedup() == pytest.approx(32 / 29)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.floats(0.3, 1.0))
def test_for_budget_hits_target_within_one_block_step(seed, target):
    g = torch.Generator().manual_seed(seed)
    l1 = torch.rand(20, 6, generator=g, dtype=torch.float64) * torch.rand(1, 6, generator=g, dtype=torch.float64)
    l1[0] = 0
    flops = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).tolist()
    p = ChangeProfile(l1, [f"b{i}" for i in range(6)], block_flops=flops, rest_flops=sum(flops))
    lo = from_change(p, 1e9).compute_fraction()
    if target < lo:
        with pytest.raises(BccError) as e:
            for_budget(p, target)
        assert e.value.code is ErrorCode.BUDGET_UNREACHABLE
        return
    s = for_budget(p, target)
    got = s.compute_fraction()
    assert got <= target + 1e-9
    total = (sum(flops) * 2) * 20
    # Granularity of a threshold sweep: the next-denser schedule would exceed the target.
    denser = from_change(p, max(s.meta["threshold"] - 1e-6, 0.0)).compute_fraction()
    assert denser > target or denser == got
    assert target - got <= max(flops) / total + (denser - got)


def test_for_budget_speedup_and_unreachable_message():
    p = _profile([[0.0, 0.1, 0.1, 0.1], [0.0, 0.3, 0.3, 0.3]])
    s = for_budget(p, 1.5, kind="speedup")
    assert s.ideal_speedup() >= 1.5 - 1e-9
    with pytest.raises(BccError) as e:
        for_budget(p, 0.1)
    assert e.value.code is ErrorCode.BUDGET_UNREACHABLE
    assert "0.2500" in str(e.value) and "to 1.0" in str(e.value)
    with pytest.raises(BccError):
        for_budget(p, 2.0)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.5"])
def test_negative_or_invalid_threshold(bad):
    with pytest.raises(BccError) as e:
        from_change(_profile([[0.0, 0.1]]), bad)
    assert e.value.code is ErrorCode.THRESHOLD_INVALID


def test_profile_validation():
    with pytest.raises(BccError) as e:
        ChangeProfile(torch.zeros(0, 2), ["a", "b"])
    assert e.value.code is ErrorCode.CALIBRATION_INVALID
    with pytest.raises(BccError):
        ChangeProfile(torch.full((2, 1), -1.0), ["a"])
    with pytest.raises(BccError):
        ChangeProfile(torch.zeros(2, 2), ["a"])


def test_profile_and_schedule_files_round_trip(tmp_path):
    p = _profile([[0.0, 0.2, 0.4], [0.0, 0.9, 0.1]], flops=[2.0, 1.0], rest=3.0)
    p.save(tmp_path / "p.json")
    q = ChangeProfile.load(tmp_path / "p.json")
    torch.testing.assert_close(q.l1_rel, p.l1_rel)
    assert q.block_names == p.block_names and q.block_flops == p.block_flops
    s = from_change(q, 0.3)
    s.save(tmp_path / "s.json")
    t = Schedule.load(tmp_path / "s.json")
    assert torch.equal(t.mask, s.mask) and t.block_costs == s.block_costs and t.meta["threshold"] == 0.3
    assert t.compute_fraction() == pytest.approx(s.compute_fraction())


def test_truncated_or_foreign_or_old_files(tmp_path):
    p = _profile([[0.0, 0.2]])
    p.save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(BccError) as e:
        ChangeProfile.load(tmp_path / "trunc.json")
    assert e.value.code is ErrorCode.FILE_INVALID and "truncated" in str(e.value)
    with pytest.raises(BccError) as e:
        Schedule.load(tmp_path / "p.json")  # a profile is not a schedule
    assert e.value.code is ErrorCode.FILE_INVALID
    old = json.loads(text)
    old["version"] = 0
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(BccError) as e:
        ChangeProfile.load(tmp_path / "old.json")
    assert e.value.code is ErrorCode.FILE_VERSION
    with pytest.raises(BccError) as e:
        ChangeProfile.load(tmp_path / "missing.json")
    assert e.value.code is ErrorCode.FILE_INVALID


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    p = _profile([[0.0, 0.2]])
    p.save(tmp_path / "p.json")
    before = (tmp_path / "p.json").read_text()
    import bcc._io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.json, "dump", boom)
    with pytest.raises(OSError):
        _profile([[0.0, 0.7]]).save(tmp_path / "p.json")
    assert (tmp_path / "p.json").read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]


def test_profile_mismatch_with_model_and_steps():
    model = torch.nn.Linear(2, 2)
    p = ChangeProfile(torch.zeros(3, 1), ["x"], fingerprint=bcc.plan.profile.model_fingerprint(model))
    p.check_compatible(model=model, num_steps=3)
    with pytest.raises(BccError) as e:
        p.check_compatible(model=torch.nn.Linear(2, 3))
    assert e.value.code is ErrorCode.PROFILE_MISMATCH
    with pytest.raises(BccError):
        p.check_compatible(num_steps=4)


def test_step_granularity_refreshes_all_blocks_on_the_flop_weighted_mean():
    # Block a changes 0.1 per step and costs 3, b 0.5 and costs 1: the mean is 0.2 per step.
    l1 = torch.tensor([[0.0, 0.0]] + [[0.1, 0.5]] * 5, dtype=torch.float64)
    p = ChangeProfile(l1, ["a", "b"], block_flops=(3.0, 1.0))
    s = from_change(p, 0.3, granularity="step")
    assert s.mask[:, 0].tolist() == [True, False, True, False, True, False]
    assert torch.equal(s.mask[:, 0], s.mask[:, 1])
    assert s.meta["granularity"] == "step"
    # Per block, each follows its own curve instead.
    per_block = from_change(p, 0.3)
    assert per_block.mask[:, 0].tolist() == [True, False, False, True, False, False]
    assert per_block.mask[:, 1].all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.floats(0.3, 1.0))
def test_step_granularity_for_budget_stays_within_target(seed, target):
    g = torch.Generator().manual_seed(seed)
    l1 = torch.rand(12, 4, generator=g, dtype=torch.float64)
    l1[0] = 0
    p = ChangeProfile(l1, list("abcd"), block_flops=tuple(float(x) for x in torch.rand(4, generator=g) + 0.1))
    s = for_budget(p, target, granularity="step")
    assert s.compute_fraction() <= target + 1e-9
    assert all(len(set(row)) == 1 for row in s.mask.tolist())  # whole steps, never part of one


def test_unknown_granularity_says_what_exists():
    p = ChangeProfile(torch.zeros(3, 1), ["a"])
    with pytest.raises(BccError, match="granularity must be one of"):
        from_change(p, 0.1, granularity="layer")


def test_planner_returns_plain_data_that_schedule_wraps():
    # The planner never builds a Schedule (schedule -> planner, not back): Schedule wraps its plans.
    p = _profile([[0.0, 0.2, 0.2, 0.2], [0.0, 0.9, 0.9, 0.9]], flops=[3.0, 1.0], rest=2.0)
    plan = plan_for_budget(p, 0.9)
    assert isinstance(plan, PlannedMask) and plan.mask.dtype == torch.bool
    s = for_budget(p, 0.9)
    assert torch.equal(s.mask, plan.mask) and dict(s.meta) == dict(plan.meta)
    assert s.block_names == p.block_names and s.block_costs == p.block_flops and s.rest_cost == 2.0
    assert s.compute_fraction() == compute_fraction(plan.mask, p.block_flops, 2.0)
    assert plan.meta["target_fraction"] == 0.9 and plan.threshold == plan.meta["threshold"]
    assert torch.equal(Schedule.from_plan(p, plan_from_change(p, 0.3)).mask, from_change(p, 0.3).mask)


def test_profile_is_immutable_and_copies_its_inputs():
    l1 = torch.tensor([[0.0], [0.2]], dtype=torch.float64)
    extra = {"cli": {"seeds": [0, 1]}}
    p = ChangeProfile(l1, ["a"], scheduler={"name": "DDIMScheduler", "config": {}}, extra=extra)
    l1[1, 0] = 9.0
    extra["cli"]["seeds"].append(2)
    assert float(p.l1_rel[1, 0]) == 0.2 and p.extra["cli"]["seeds"] == (0, 1)
    with pytest.raises(TypeError):
        p.extra["cli"]["steps"] = 5
    with pytest.raises(TypeError):
        p.scheduler["name"] = "other"
    q = p.with_extra(note="x")
    assert q.extra["note"] == "x" and "note" not in p.extra and q.extra["cli"] == p.extra["cli"]
    assert json.loads(json.dumps(q.to_dict()))["extra"] == {"cli": {"seeds": [0, 1]}, "note": "x"}
    import copy
    import pickle

    for r in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert r.extra == q.extra and torch.equal(r.l1_rel, q.l1_rel)


# -- bcc.Plan: one recipe, any step count ----------------------------------------------------
def _curve_profile(steps, names=("a", "b"), seed=0):
    l1 = torch.rand(steps, len(names), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    l1[0] = 0
    return ChangeProfile(l1, list(names), block_flops=[2.0, 1.0], rest_flops=1.0)


def test_plan_serves_any_step_count_from_the_nearest_profile():
    p6, p12 = _curve_profile(6, seed=1), _curve_profile(12, seed=2)
    plan = bcc.Plan((p6, p12), budget=0.7)
    assert plan.profile_for(6) is p6 and plan.profile_for(12) is p12
    assert plan.schedule_for(6).meta["plan_resampled_from"] is None
    assert torch.equal(plan.schedule_for(6).mask, for_budget(p6, 0.7).mask)  # exact step count: the profile itself
    assert [plan.schedule_for(t).meta["plan_resampled_from"] for t in (4, 7, 9, 11, 30)] == [6, 6, 12, 12, 12]
    for t in (2, 7, 30):
        s = plan.schedule_for(t)
        assert s.num_steps == t and s.block_names == ("a", "b") and s.compute_fraction() <= 0.7 + 1e-9
        assert bool(s.mask[0].all())


def test_resampling_keeps_the_total_change_and_spreads_it_over_time():
    p = _curve_profile(10, seed=3)
    for t in (2, 5, 10, 17, 40):
        q = resample_profile(p, t)
        assert q.num_steps == t and float(q.l1_rel[0].abs().sum()) == 0.0
        torch.testing.assert_close(q.l1_rel.sum(0), p.l1_rel.sum(0))
        assert q.block_flops == p.block_flops and q.fingerprint == p.fingerprint
    assert resample_profile(p, 10) is p
    # twice the steps: each new step carries about half an old step's change
    q = resample_profile(ChangeProfile(torch.tensor([[0.0], [0.4], [0.4]]), ["a"]), 5)
    assert [round(v, 6) for v in q.l1_rel[:, 0].tolist()] == [0.0, 0.2, 0.2, 0.2, 0.2]


def test_a_threshold_plan_keeps_its_meaning_across_step_counts():
    flat = ChangeProfile(torch.tensor([[0.0]] + [[0.1]] * 10), ["a"])  # 1.0 of change over the trajectory
    plan = bcc.Plan(flat, threshold=0.27)
    # three refreshes after step 0 whatever the step count: the change per step scales with it
    assert [int(plan.schedule_for(t).mask[1:].sum()) for t in (11, 21, 41)] == [3, 3, 3]


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of budget"), ({"budget": 0.5, "threshold": 0.1}, "exactly one of budget"),
    ({"budget": 1.5}, "budget must be a number in"), ({"speedup": 0.5}, "speedup must be"),
    ({"threshold": -1.0}, "threshold must be"), ({"budget": 0.5, "granularity": "layer"}, "granularity"),
])
def test_plan_validates_its_fields(kwargs, match):
    with pytest.raises(BccError, match=match) as e:
        bcc.Plan(_curve_profile(4), **kwargs)
    assert e.value.code is ErrorCode.CONFIG_INVALID


def test_plan_refuses_profiles_of_other_blocks_or_one_step_count_twice():
    with pytest.raises(BccError, match="same blocks"):
        bcc.Plan((_curve_profile(4), _curve_profile(6, names=("a", "c"))), budget=0.8)
    with pytest.raises(BccError, match="one step count"):
        bcc.Plan((_curve_profile(4, seed=1), _curve_profile(4, seed=2)), budget=0.8)
    with pytest.raises(BccError, match="ChangeProfile"):
        bcc.Plan("profile.json", budget=0.8)


def test_plan_is_frozen_and_round_trips():
    profiles = [_curve_profile(4), _curve_profile(8, seed=5)]
    plan = bcc.Plan(profiles, speedup=1.4, granularity="step")
    profiles.append(_curve_profile(16))  # the plan keeps its own tuple
    assert len(plan.profiles) == 2
    with pytest.raises(Exception):
        plan.budget = 0.5
    back = bcc.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.speedup == 1.4 and back.granularity == "step"
    assert torch.equal(back.schedule_for(6).mask, plan.schedule_for(6).mask)


# -- one expert of several (Wan 2.2): a profile over part of the steps ---------------------------
def _expert(l1, start, stop, flops=None, rest=0.0):
    full = torch.zeros(l1.shape[0], l1.shape[1], dtype=torch.float64)
    full[start + 1:stop] = l1[start + 1:stop]
    return ChangeProfile(full, [f"b{i}" for i in range(l1.shape[1])], block_flops=flops, rest_flops=rest,
                         active_steps=(start, stop))


def test_an_expert_schedule_by_hand():
    # Steps 2..5 of 6: step 2 is its first call (fills the cache), then 0.2 a step against δ 0.3.
    p = _expert(torch.full((6, 1), 0.2, dtype=torch.float64), 2, 6)
    s = from_change(p, 0.3)
    assert s.mask[:, 0].tolist() == [True, True, True, False, True, False]  # steps 0, 1: not its own
    assert s.active_steps == (2, 6) and s.compute_fraction() == 0.5  # 2 of its 4 steps
    assert s.to_text().splitlines()[1] == "  b0   #.#."
    # The budget counts its own steps: 0.5 of 4 is reachable, f_min is 1 / 4.
    assert for_budget(p, 0.5).mask[:, 0].tolist() == s.mask[:, 0].tolist()
    with pytest.raises(BccError) as e:
        for_budget(p, 0.2)
    assert e.value.code is ErrorCode.BUDGET_UNREACHABLE and "0.2500" in str(e.value)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.integers(1, 3), st.data())
def test_an_expert_is_planned_as_a_trajectory_of_its_own_steps(T, K, data):
    start = data.draw(st.integers(0, T - 1))
    stop = data.draw(st.integers(start + 1, T))
    l1 = torch.tensor(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=K, max_size=K), min_size=T, max_size=T)),
                      dtype=torch.float64)
    flops = data.draw(st.lists(st.floats(0.5, 4), min_size=K, max_size=K))
    expert = _expert(l1, start, stop, flops, rest=1.0)
    alone = l1[start:stop].clone()
    alone[0] = 0
    own = ChangeProfile(alone, expert.block_names, block_flops=flops, rest_flops=1.0)  # its steps only
    threshold = data.draw(st.floats(0, 2))
    got, want = from_change(expert, threshold), from_change(own, threshold)
    assert torch.equal(got.mask[start:stop], want.mask) and got.mask[:start].all() and got.mask[stop:].all()
    assert got.compute_fraction() == pytest.approx(want.compute_fraction())
    target = data.draw(st.floats(0.05, 1.0))
    try:
        want = for_budget(own, target)
    except BccError:
        with pytest.raises(BccError):
            for_budget(expert, target)
        return
    got = for_budget(expert, target)
    assert torch.equal(got.mask[start:stop], want.mask)
    assert got.compute_fraction() == pytest.approx(want.compute_fraction()) and got.compute_fraction() <= target + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.integers(1, 60), st.data())
def test_resampled_experts_still_split_the_steps(T, N, data):
    b = data.draw(st.integers(1, T - 1))
    hi = _expert(torch.rand(T, 2, dtype=torch.float64), 0, b)
    lo = _expert(torch.rand(T, 2, dtype=torch.float64), b, T)
    rh, rl = resample_profile(hi, N).active_steps, resample_profile(lo, N).active_steps
    assert rh[0] == 0 and rl[1] == N and rh[1] - rh[0] >= 1 and rl[1] - rl[0] >= 1
    if N > 1:  # where one stops the other starts, at the boundary's normalised time (to within a step)
        assert rh[1] == rl[0] and abs(rl[0] - (b - 0.5) * (N - 1) / (T - 1)) <= 1
    for r in (resample_profile(hi, N), resample_profile(lo, N)):
        assert not r.l1_rel[:r.active_steps[0] + 1].any() and not r.l1_rel[r.active_steps[1]:].any()
    assert resample_profile(lo, T) is lo


def test_active_steps_in_files_and_bad_ranges(tmp_path):
    p = _expert(torch.rand(5, 2, dtype=torch.float64), 1, 4)
    p.save(tmp_path / "p.json")
    assert ChangeProfile.load(tmp_path / "p.json").active_steps == (1, 4)
    s = from_change(p, 0.1)
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s and Schedule.from_dict(s.to_dict()).active_steps == (1, 4)
    import pickle
    assert pickle.loads(pickle.dumps(s)).active_steps == (1, 4)
    assert s != Schedule(s.mask, s.block_names, s.timesteps, s.block_costs, s.rest_cost)
    assert s.reorder(["b1", "b0"]).active_steps == (1, 4)
    for bad in [(0, 6), (3, 3), (-1, 2), (True, 3), (1.5, 3), (1, 2, 3), "ab"]:
        with pytest.raises(BccError) as e:
            ChangeProfile(torch.zeros(5, 1), ["a"], active_steps=bad)
        assert e.value.code is ErrorCode.CALIBRATION_INVALID and "active_steps" in str(e.value)
        with pytest.raises(BccError) as e:
            Schedule(torch.ones(5, 1, dtype=torch.bool), ["a"], active_steps=bad)
        assert e.value.code is ErrorCode.SCHEDULE_SHAPE
    with pytest.raises(BccError) as e:  # change measured where the denoiser does not run
        ChangeProfile(torch.tensor([[0.0], [0.3], [0.0]]), ["a"], active_steps=(2, 3))
    assert e.value.code is ErrorCode.CALIBRATION_INVALID and "outside active_steps" in str(e.value)


def test_the_search_refuses_a_profile_of_part_of_the_steps():
    from bcc.plan.search import search_schedule

    with pytest.raises(BccError) as e:
        search_schedule(None, None, _expert(torch.rand(4, 1, dtype=torch.float64), 1, 4), 0.7, seeds=[0])
    assert e.value.code is ErrorCode.CONFIG_INVALID and "bcc.Plan" in str(e.value)


def test_a_plan_out_of_reach_at_its_own_step_count_is_refused_when_made():
    p = _profile([[0.0, 0.3, 0.3, 0.3], [0.0, 0.1, 0.1, 0.1]])
    with pytest.raises(BccError) as e:
        bcc.Plan(p, budget=0.1)  # not at the first denoiser call of a generation
    assert e.value.code is ErrorCode.BUDGET_UNREACHABLE and "0.2500" in str(e.value)
    assert bcc.Plan(p, speedup=2.0).schedule_for(4).compute_fraction() <= 0.5
