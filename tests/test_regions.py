"""Regions (``"start..end"``): a cached unit spanning several modules.

Golden structure on an analytic toy (which nodes a region holds, what it absorbs,
what it refuses), numerics against a reference written by hand for the toy (the
toy's forward with an explicit cache), hypothesis over schedules mixing a region and
a module block, and a differential test against DeepCache itself: bcc's every-N
schedule on ``unet_branch(unet, b)`` must equal DeepCache's ``cache_interval=N,
cache_branch_id=b`` on the shipped UNet.
"""
import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcc
from bcc import BccError, ErrorCode, Schedule
from bcc.analyze.blocks import find_block_regions
from bcc.capture.graph import capture
from bcc.runtime.reference import HookReference

TOL = dict(rtol=1e-5, atol=1e-5)


class Toy(torch.nn.Module):
    """in -> a -> b (+ a time projection) -> c(cat with a's output) -> d(cat with in's) -> out:
    a UNet in miniature, with one skip inside "a..c" and one around it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.tproj = torch.nn.Linear(1, 8)
        self.c, self.d, self.out = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), torch.nn.Linear(8, 8)

    def forward(self, x, t):
        temb = t.reshape(1, 1).float()
        h0 = self.inp(x)
        h1 = torch.tanh(self.a(h0))
        h2 = self.b(h1) + self.tproj(temb)
        h3 = self.c(torch.cat([h2, h1], -1))
        h4 = self.d(torch.cat([h3, h0], -1))
        return self.out(h4)


def toy_reference(model, xs, mask_region, mask_out):
    """The toy's trajectory with "a..c" and "out" cached by hand (whole outputs)."""
    outs, h3_cache, out_cache = [], None, None
    for s, x in enumerate(xs):
        t = torch.tensor(float(s))
        h0 = model.inp(x)
        if mask_region[s]:
            h1 = torch.tanh(model.a(h0))
            h3_cache = model.c(torch.cat([model.b(h1) + model.tproj(t.reshape(1, 1)), h1], -1))
        h4 = model.d(torch.cat([h3_cache, h0], -1))
        if mask_out[s]:
            out_cache = model.out(h4)
        outs.append(out_cache.clone())
    return outs


def _inputs(steps):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, generator=g) for _ in range(steps)]


def _run(model, xs):
    with torch.no_grad():
        return [model(x, torch.tensor(float(s))) for s, x in enumerate(xs)]


def _blocks(model, selector):
    return find_block_regions(capture(model, (torch.randn(2, 8), torch.tensor(0.0))).gm, selector)


def test_region_holds_the_span_and_what_only_it_reads():
    (blk,) = _blocks(Toy(), ["a..c"])
    assert blk.name == "a..c" and blk.class_name == "region"
    # The time projection is read only inside: it comes along (skipped with the region).
    assert blk.members == ("a", "b", "tproj", "c")
    # `inp` feeds the region and the skip around it: it stays outside.
    paths = {path for n in blk.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values()}
    assert {"a", "b", "tproj", "c"} <= paths and not paths & {"inp", "d", "out"}


def test_region_and_module_blocks_in_execution_order():
    names = bcc.find_blocks(Toy(), ((torch.randn(2, 8), torch.tensor(0.0)), {}), blocks=["out", "a..c", "b"])
    assert names == ["a..c", "out"]  # "b" lies inside the region: the region caches it


@pytest.mark.parametrize("name, code, words", [
    ("a..b", ErrorCode.BLOCK_NOT_REGION, "read after it"),      # a's output is also c's skip
    ("c..a", ErrorCode.BLOCK_NOT_REGION, "does not depend"),
    ("a..nope", ErrorCode.BLOCK_NOT_FOUND, "no module 'nope'"),
])
def test_region_errors(name, code, words):
    with pytest.raises(BccError) as e:
        _blocks(Toy(), [name])
    assert e.value.code is code and words in str(e.value)


def test_overlapping_regions_are_refused():
    with pytest.raises(BccError) as e:
        _blocks(Toy(), ["a..c", "b..d"])
    assert e.value.code is ErrorCode.BLOCK_NOT_REGION and "overlap" in str(e.value)


def test_region_helpers():
    assert bcc.region("a", "c") == "a..c"
    with pytest.raises(BccError):
        bcc.region("a..b", "c")


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_region_schedule_equals_hand_reference(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, xs = Toy(), _inputs(6)
    mask = torch.tensor([[1, 1], [0, 1], [0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    counter = CompileCounterWithBackend(backend)
    fast = bcc.compile(model, Schedule(mask, ["a..c", "out"]), backend=counter)
    want = toy_reference(model, xs, mask[:, 0].tolist(), mask[:, 1].tolist())
    for _ in range(2):  # a second trajectory: no stale cache, no recompile
        for g, w in zip(_run(fast, xs), want):
            torch.testing.assert_close(g, w, **TOL)
    assert counter.frame_count == 1 and fast.bcc_stats()["graphs"] == 1


def test_hook_reference_on_a_region_equals_hand_reference():
    model, xs = Toy(), _inputs(5)
    schedule = Schedule.every(2, 5, ["a..c", "out"])
    ref = HookReference(model, schedule)
    try:
        got = _run(model, xs)
    finally:
        ref.remove()
    m = schedule.mask
    for g, w in zip(got, toy_reference(model, xs, m[:, 0].tolist(), m[:, 1].tolist())):
        torch.testing.assert_close(g, w, **TOL)


def test_random_region_schedules_without_recompiling():
    steps, model, xs = 5, Toy(), _inputs(5)
    fast = bcc.compile(model, Schedule.all_compute(steps, ["a..c", "out"]), backend="eager")
    _run(fast, xs)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=steps - 1, max_size=steps - 1))
    def check(rows):
        mask = torch.tensor([(True, True)] + rows, dtype=torch.bool)
        fast.set_schedule(Schedule(mask, ["a..c", "out"]))
        for g, w in zip(_run(fast, xs), toy_reference(model, xs, mask[:, 0].tolist(), mask[:, 1].tolist())):
            torch.testing.assert_close(g, w, **TOL)

    check()
    assert fast.bcc_stats()["graphs"] == 1


def test_region_profile_and_flops():
    model, xs = Toy(), _inputs(4)

    def one_run(m, cond, seed):
        _run(m, xs)

    profile = bcc.calibrate(model, one_run, [0], seeds=[0], blocks=["a..c", "out"], progress=False, mode="output")
    assert profile.block_names == ("a..c", "out")
    # Analytic FLOPs: 2 * batch * in * out per Linear. The region holds a, b, tproj, c.
    flops = {"a": 2 * 2 * 8 * 8, "b": 2 * 2 * 8 * 8, "tproj": 2 * 1 * 1 * 8, "c": 2 * 2 * 16 * 8}
    assert profile.block_flops[0] == pytest.approx(sum(flops.values()))
    # Whole-output change of c's output between steps: measured by hand.
    want = []
    with torch.no_grad():
        prev = None
        for s, x in enumerate(xs):
            h1 = torch.tanh(model.a(model.inp(x)))
            h3 = model.c(torch.cat([model.b(h1) + model.tproj(torch.tensor(float(s)).reshape(1, 1)), h1], -1))
            want.append(0.0 if prev is None else float((h3 - prev).abs().sum() / h3.abs().sum()))
            prev = h3
    torch.testing.assert_close(profile.l1_rel[:, 0].float(), torch.tensor(want), rtol=1e-4, atol=1e-6)


# -- a region with a residual stream ------------------------------------------------------

class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h, extra=None):
        r = h + torch.tanh(self.lin(h))
        return r if extra is None else r + extra


class ResToy(torch.nn.Module):
    """inp -> l1 -> l2 (+ skip) -> out(+ skip): a run of residual layers. ``skip`` is shaped
    like the stream and reaches l2's output along an identity path too, but only the
    stream entering l1 (what the region's start reads) may be the region's residual base."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inp, self.side, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.l1, self.l2 = Layer(), Layer()

    def forward(self, x, t):
        h0 = self.inp(x)
        skip = self.side(x) * t
        h2 = self.l2(self.l1(h0), skip)
        return self.out(h2 + skip)


def res_reference(model, xs, mask):
    """ResToy with "l1..l2" cached by hand as a residual of l1's input."""
    outs, delta = [], None
    for s, x in enumerate(xs):
        h0, skip = model.inp(x), model.side(x) * float(s)
        if mask[s]:
            h2 = model.l2(model.l1(h0), skip)
            delta = h2 - h0
        else:
            h2 = h0 + delta
        outs.append(model.out(h2 + skip))
    return outs


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_region_caches_the_residual_of_its_entering_stream(backend):
    model, xs = ResToy(), _inputs(6)
    mask = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    fast = bcc.compile(model, Schedule(mask[:, None], ["l1..l2"]), backend=backend)
    with torch.no_grad():
        want = res_reference(model, xs, mask.tolist())
    for g, w in zip(_run(fast, xs), want):
        torch.testing.assert_close(g, w, **TOL)
    # Cached whole instead, the same schedule gives other values: the test can tell.
    whole = bcc.compile(model, Schedule(mask[:, None], ["l1..l2"]), backend="eager", mode="output")
    assert not torch.allclose(_run(whole, xs)[2], want[2], atol=1e-3)


def test_eager_tools_agree_on_a_region_residual():
    model, xs = ResToy(), _inputs(5)
    schedule = Schedule.every(2, 5, ["l1..l2"])
    ref = HookReference(model, schedule)
    try:
        got = _run(model, xs)
        assert _run(model, xs)[3].shape == (2, 8)  # a second trajectory, the decision reused
    finally:
        ref.remove()
    with torch.no_grad():
        want = res_reference(model, xs, schedule.mask[:, 0].tolist())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    # Calibration measures the change of the same residual, by hand.
    profile = bcc.calibrate(model, lambda m, c, seed: _run(m, xs), [0], seeds=[0], blocks=["l1..l2"], progress=False)
    with torch.no_grad():
        deltas = [model.l2(model.l1(model.inp(x)), model.side(x) * float(s)) - model.inp(x) for s, x in enumerate(xs)]
    want = [0.0] + [float((d - p).abs().sum() / d.abs().sum()) for p, d in zip(deltas, deltas[1:])]
    torch.testing.assert_close(profile.l1_rel[:, 0].float(), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_region_recording_is_dropped_when_the_forward_raises():
    model, xs = ResToy(), _inputs(3)
    ref = HookReference(model, Schedule.all_compute(3, ["l1..l2"]))
    try:
        original = model.l2.lin.forward
        model.l2.lin.forward = lambda h: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            model(xs[0], torch.tensor(0.0))
        # The recording started at l1 would otherwise stay on torch's dispatch stack.
        assert _get_current_dispatch_mode() is None
        model.l2.lin.forward = original
        # And the next trajectory is the plain model's.
        with torch.no_grad():
            got = _run(model, xs)
    finally:
        ref.remove()
    del model.l2.lin.forward
    with torch.no_grad():
        for g, w in zip(got, [model(x, torch.tensor(float(s))) for s, x in enumerate(xs)]):
            torch.testing.assert_close(g, w, **TOL)


# -- DeepCache, on the shipped UNet -------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample

    model, cond, train = load_digits_model(default_model_dir("unet"))
    sched = make_scheduler("ddim", train)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, sched, lambda den: sample(den, cond, sched, [3, 7], num_steps=6, guidance_scale=3.0, noise=noise)


@pytest.mark.parametrize("branch, backend", [(0, "eager"), (3, "eager"), (0, "inductor")])
def test_deepcache_is_a_bcc_schedule(digits, branch, backend):
    pytest.importorskip("DeepCache")
    from bcc.tools.bench.peers import PeerSetting, enable

    model, sched, run = digits
    with enable(model, PeerSetting("deepcache", "dc", {"cache_interval": 3, "cache_branch_id": branch}), sched) as den:
        want = run(den)
    name = bcc.unet_branch(model, branch)
    fast = bcc.compile(model, Schedule.every(3, 6, [name]), backend=backend)
    got = run(fast)
    tol = TOL if backend == "eager" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    assert not torch.allclose(got, run(model), atol=1e-3)  # something was skipped


def test_unet_branch_names(digits):
    model = digits[0]
    assert bcc.unet_branch(model, 0) == "down_blocks.0..up_blocks.2.resnets.0"
    assert bcc.unet_branch(model, 3) == "down_blocks.1..up_blocks.1.attentions.0"
    with pytest.raises(BccError) as e:
        bcc.unet_branch(model, 9)
    assert "branch 9" in str(e.value)


def test_dit_run_of_layers(digits):
    from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample

    model, cond, train = load_digits_model(default_model_dir("dit"))
    sched = make_scheduler("ddim", train)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(den):
        return sample(den, cond, sched, [3, 7], num_steps=5, guidance_scale=3.0, noise=noise)

    name = bcc.region("transformer_blocks.1", "transformer_blocks.2")
    schedule = Schedule.every(2, 5, [name])
    ref = HookReference(model, schedule)
    try:
        want = run(model)
    finally:
        ref.remove()
    fast = bcc.compile(model, schedule, backend="eager")
    torch.testing.assert_close(run(fast), want, **TOL)
