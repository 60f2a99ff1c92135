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


@pytest.mark.parametrize("name", ["unet-tiny", "pixart"])
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_eager_specialize_equals_reference_exactly(name, data):
    model, args, kwargs = built(name)
    names = bcc.find_blocks(model, (args, kwargs))
    mode = data.draw(st.sampled_from(["residual", "output"]))
    schedule = random_schedule(data, names, 5)
    inputs = trajectory_inputs(name, model, 5)
    want = reference_outputs(model, schedule, inputs, mode)
    got = run(bcc.compile(model, schedule, backend="eager", mode=mode, strategy="specialize"), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


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
