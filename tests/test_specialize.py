"""strategy="specialize": one branch-free graph per distinct schedule row.

Golden graph of the pass, exact equality with the hook reference (eager) for random
schedules, and the compile contract: one compiled graph per distinct row, none more
on a second trajectory, no graph breaks.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import bcc
from bcc import Schedule
from bcc.capture.graph import capture
from bcc.errors import BccError
from bcc.passes import AnnotateBlocksPass, GateBlocksPass, OutlineBlocksPass, SpecializeRowPass
from bcc.passes.specialize_row import specialized

from testing import Toy, built, random_schedule, reference_outputs, run, trajectory_inputs


def _gated(model, args, names, mode="residual"):
    gm = capture(model, args).gm
    for p in (AnnotateBlocksPass(names=names), OutlineBlocksPass(), GateBlocksPass(mode=mode)):
        gm = p(gm).graph_module
    return gm


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = torch.nn.Linear(4, 4)
        self.b1 = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.b1(self.b0(x)) * t


def test_golden_row_inlines_taken_branches_and_keeps_the_signature():
    x = torch.randn(2, 4)
    gated = _gated(_Lin(), (x, torch.tensor(2.0)), ["b0", "b1"])
    spec = SpecializeRowPass([True, False])(specialized(gated)).graph_module
    get = "<built-in function getitem>"
    # b0 and b1 are cached whole: a recomputed block's new cache is its output itself.
    assert _ops(spec) == ["aten.contiguous.default", "bcc_recompute_0", get,
                          "aten.contiguous.default", "bcc_reuse_1", get, "aten.mul.Tensor"]
    # The reused block's cache leaves as the cache input itself: no copy of an unchanged cache.
    outputs = spec.graph.output_node().args[0]
    assert outputs[-1].op == "placeholder" and outputs[-1].name == "bcc_cache_1_0"
    assert outputs[-2].op != "placeholder"  # the recomputed block's new cache
    kept = SpecializeRowPass([True, False], pass_through=False)(specialized(gated)).graph_module
    assert kept.graph.output_node().args[0][-1].op != "placeholder"  # CUDA graphs: the copy stays
    assert [n.name for n in spec.graph.nodes if n.op == "placeholder"] == \
        [n.name for n in gated.graph.nodes if n.op == "placeholder"]
    # The gated graph is untouched (each row gets its own copy) and shares the weights.
    assert sum(n.target is torch.ops.higher_order.cond for n in gated.graph.nodes) == 2
    weights = {id(p) for p in gated.parameters()}
    assert list(spec.parameters())
    assert all(id(p) in weights for p in spec.parameters())


@pytest.mark.parametrize("mode", ["residual", "output"])
def test_each_row_equals_the_gated_graph_on_that_row(mode):
    x, t = torch.randn(2, 4), torch.tensor(3.0)
    gated = _gated(Toy(), (x, t), ["b0", "b1"], mode=mode)
    caches = [torch.randn(2, 4), torch.randn(2, 4)]
    for row in ([True, True], [True, False], [False, True], [False, False]):
        schedule = torch.tensor([row])
        want = gated(schedule, torch.tensor(0), *caches, x, t)
        got = SpecializeRowPass(row)(specialized(gated)).graph_module(schedule, torch.tensor(0), *caches, x, t)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["specialize", "hybrid"])
@pytest.mark.parametrize("name", ["unet-tiny", "pixart"])
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_eager_row_dispatch_equals_reference_exactly(name, strategy, data):
    """specialize: a graph per row; hybrid: uniform rows their own graphs, mixed rows the
    branch graph, caches handed across. Both bit for bit the hook reference, twice (a second
    trajectory starts from the first one's caches)."""
    model, args, kwargs = built(name)
    names = bcc.find_blocks(model, (args, kwargs))
    mode = data.draw(st.sampled_from(["residual", "output"]))
    schedule = random_schedule(data, names, 6)
    inputs = trajectory_inputs(name, model, 6)
    want = reference_outputs(model, schedule, inputs, mode)
    fast = bcc.compile(model, schedule, backend="eager", mode=mode, strategy=strategy)
    for _ in range(2):
        got = run(fast, inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    if strategy == "hybrid":
        assert fast.bcc_stats()["graphs"] <= 4


def test_compiled_one_graph_per_distinct_row_and_none_on_the_second_trajectory():
    model, args, kwargs = built("pixart")
    names = bcc.find_blocks(model, (args, kwargs))
    schedule = Schedule.every(2, 6, names)  # rows: all True, all False
    counter = CompileCounterWithBackend("inductor")
    fast = bcc.compile(model, schedule, backend=counter, strategy="specialize")
    inputs = trajectory_inputs("pixart", model, 6)
    counters.clear()
    first = run(fast, inputs)
    assert counter.frame_count == 2
    second = run(fast, inputs)
    assert counter.frame_count == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    want = reference_outputs(model, schedule, inputs)
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)
    assert fast.bcc_stats()["graphs"] == 2


def test_unknown_strategy_says_what_to_use():
    with pytest.raises(BccError, match="strategy must be one of"):
        bcc.BccConfig(strategy="cudagraph")


# -- dead caches and gaps ----------------------------------------------------------------

class _Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.b0, self.b1, self.b2 = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x, t):
        return self.b2(torch.tanh(self.b1(self.b0(x) * t)))


def _by_hand(net, mask, called, inputs):
    """Output mode by hand: a reused block returns its last computed output; the first call
    and the call after a skipped step compute every block."""
    last, prev, outs = {}, None, []

    def block(i, row, h):
        if row[i]:
            last[i] = getattr(net, f"b{i}")(h)
        return last[i]

    for s in called:
        row = mask[s].tolist() if prev is not None and s == prev + 1 else [True] * 3
        x, t = inputs[s]
        outs.append(block(2, row, torch.tanh(block(1, row, block(0, row, x) * t))))
        prev = s
    return outs


def test_dead_caches_leave_unwritten_and_the_all_true_row_is_the_plain_graph():
    x, t = torch.randn(2, 4), torch.tensor(3.0)
    gated = _gated(Toy(), (x, t), ["b0", "b1"])
    written = SpecializeRowPass([True, True], write=[True, True])(specialized(gated)).graph_module
    dead = SpecializeRowPass([True, True], write=[False, False])(specialized(gated)).graph_module
    n = len(written.meta["bcc_cache_slots"])
    get = "<built-in function getitem>"
    # Each recomputed block's call gives its output and, where written and held as a
    # residual, its new cache (the compiler drops the residual with the unused getitem).
    assert _ops(written).count(get) > _ops(dead).count(get) == 2
    assert all(o.op == "placeholder" for o in dead.graph.output_node().args[0][-n:])
    caches = [torch.randn(2, 4), torch.randn(2, 4)]
    got = dead(torch.ones(1, 2, dtype=torch.bool), torch.tensor(0), *caches, x, t)
    want = written(torch.ones(1, 2, dtype=torch.bool), torch.tensor(0), *caches, x, t)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert all(g is c for g, c in zip(got[-n:], caches))
    with pytest.raises(bcc.BccInternalError, match="pass through"):
        SpecializeRowPass([True, True], pass_through=False, write=[False, False])


@pytest.mark.parametrize("strategy", ["branch", "specialize"])
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_skipped_steps_and_dead_caches_equal_the_hand_reference(strategy, data):
    net, T = _Chain(), 7
    names = ["b0", "b1", "b2"]
    schedule = random_schedule(data, names, T)
    called = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=1)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 9)))
    inputs = [(torch.randn(2, 4, generator=gen), torch.tensor(1.0 - s / T)) for s in range(T)]
    fast = bcc.compile(net, schedule, backend="eager", mode="output", strategy=strategy)
    with torch.no_grad():
        got = [fast.bcc_call_at(bcc.StepRef(step=s, num_steps=T, stream=0), *inputs[s]) for s in called]
        want = _by_hand(net, schedule.mask, called, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_a_row_gets_a_graph_per_set_of_caches_the_next_row_reads():
    net, names = _Chain(), ["b0", "b1", "b2"]
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    fast = bcc.compile(net, Schedule(mask, names), backend="eager", mode="output", strategy="specialize")
    with torch.no_grad():
        for s in range(6):
            fast(torch.randn(2, 4), torch.tensor(1.0))
    # all-True before all-True (no cache written), all-True before a reuse, all-False
    assert fast.bcc_stats()["graphs"] == 3


def test_compiled_hybrid_compiles_at_most_four_graphs_for_any_schedule():
    model, args, kwargs = built("pixart")
    names = bcc.find_blocks(model, (args, kwargs))
    assert len(names) >= 2
    mixed = torch.ones(6, len(names), dtype=torch.bool)
    mixed[1, 0] = mixed[4, 1:] = False  # two mixed rows; rows 0 and 3 reused by the next: caches written
    mixed[2, 1] = False
    schedules = [Schedule.all_compute(6, names), Schedule(mixed, names), Schedule.every(3, 6, names)]
    counter = CompileCounterWithBackend("inductor")
    fast = bcc.compile(model, schedules[0], backend=counter, strategy="hybrid")
    inputs = trajectory_inputs("pixart", model, 6)
    counters.clear()
    run(fast, inputs)
    assert counter.frame_count == 1  # all True, nothing reused: the plain model's graph only
    for s in schedules[1:]:
        fast.set_schedule(s)
        got = run(fast, inputs)
        want = reference_outputs(model, s, inputs)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)
    # The all-True row before an all-True row (writes no cache) and before a reusing row
    # (writes every cache), the all-False row, the branch graph; none more on a second pass.
    assert counter.frame_count == 4
    run(fast, inputs)
    assert counter.frame_count == 4 and fast.bcc_stats()["graphs"] == 4
    assert not counters["graph_break"], dict(counters["graph_break"])
