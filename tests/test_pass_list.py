"""One pass list for every lowering, one stepper for every runner.

The pass list (bcc.passes.DEFAULT_PASSES) is what bcc.compile, torch.compile(backend="bcc")
and bcc.export run; its per-cond predicate makes inductor's C++ wrapper right; the
stepper gives each stream of a step caches of its own and refuses a step reference
for another step count.
"""
import pytest
import torch
from torch import nn

import bcc
import bcc.passes
from bcc import BccError, ErrorCode, Schedule, StepRef
from bcc.config import DEFAULT_INDUCTOR_OPTIONS
from bcc.lower.backend import bcc_backend
from bcc.passes import DEFAULT_PASSES, PASSES_RUN, PassEntry

from testing import Toy, reference_outputs

COND = torch.ops.higher_order.cond


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class _Net(nn.Module):
    """Three weighted residual blocks: compiles in seconds, and blocks read different bits."""

    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Residual(width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x)
        return self.out(x) * t


NAMES = ["blocks.0", "blocks.1", "blocks.2"]


class _Square(nn.Module):
    def forward(self, x):
        return x + x * x  # residual x * x on the identity path


class _AddTen(nn.Module):
    def forward(self, x):
        return x + 10  # residual 10


class _Toy(nn.Module):
    """Analytic blocks: a reuse and a recompute give different, exactly known values."""

    def __init__(self):
        super().__init__()
        self.b0, self.b1 = _Square(), _AddTen()

    def forward(self, x, t):
        return self.b1(self.b0(x)) + t


def _steps(n, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=g), torch.tensor(1.0 - s / (2 * n))) for s in range(n)]


def _random_schedule(num_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_steps, len(NAMES), generator=g) < 0.5
    mask[0] = True
    assert not mask.all()
    return Schedule(mask, NAMES)


def _exact(got, want):
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"step {s}: {m}")


# -- one pass list ------------------------------------------------------------------

class _Record(torch.fx.passes.infra.pass_base.PassBase):
    def __init__(self, log, config):
        super().__init__()
        self.log, self.config = log, config

    def call(self, gm):
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.log.append((self.config.target, sum(COND is n.target for n in gm.graph.nodes),
                         any(p.startswith("bcc_w") for p in placeholders)))
        return torch.fx.passes.infra.pass_base.PassResult(gm, False)


def test_compile_backend_and_export_run_the_one_pass_list(monkeypatch):
    log = []
    monkeypatch.setattr(bcc.passes, "DEFAULT_PASSES",
                        (*DEFAULT_PASSES, PassEntry("record", lambda config: _Record(log, config))))
    net, schedule = _Net(), Schedule.every(2, 2, NAMES)
    x, t = _steps(1)[0]

    fast = bcc.compile(net, schedule, backend="eager")
    fast(x, t)
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        graphs.append(bcc_backend(gm, example_inputs, **kwargs))
        return graphs[-1]

    dynamo = torch.compile(net, backend=spy, fullgraph=True, dynamic=False,
                           options={"schedule": schedule, "backend": "eager"})
    dynamo(x, t)
    bcc.export(net, schedule, ((x, t), {}))

    # Every entry point ran the whole list, the recorder last: three conds each, and
    # weights lifted to inputs only for export.
    assert log == [("compile", 3, False), ("compile", 3, False), ("export", 3, True)]
    everything = tuple(e.name for e in DEFAULT_PASSES) + ("record",)
    compiled = tuple(n for n in everything if n != "lift_weights")
    assert fast.bcc_graph().meta[PASSES_RUN] == graphs[0].graph.meta[PASSES_RUN] == compiled


def test_every_lowering_gives_each_cond_a_predicate_of_its_own():
    net, schedule = _Net(), _random_schedule(3)
    x, t = _steps(1)[0]
    fast = bcc.compile(net, schedule, backend="eager")
    fast(x, t)
    ep = bcc.export(net, schedule, ((x, t), {}))
    for graph in (fast.bcc_graph().graph, ep.graph):
        preds = [n.args[0] for n in graph.nodes if n.target is COND]
        assert len(preds) == 3
        assert all(p.target is torch.ops.aten.eq.Scalar for p in preds)


def test_cpp_wrapper_equals_the_default_wrapper():
    # Before the per-cond predicate ran for bcc.compile, cpp_wrapper=True made every
    # block read block 0's bit: errors of 0.5 at the first reuse steps of this model.
    net, schedule, steps = _Net(), _random_schedule(6), _steps(6)
    python = bcc.compile(net, schedule)
    cpp = bcc.compile(net, schedule, inductor_options={**DEFAULT_INDUCTOR_OPTIONS, "cpp_wrapper": True})
    with torch.no_grad():
        want = [python(x, t) for x, t in steps]
        got = [cpp(x, t) for x, t in steps]
        full = [net(x, t) for x, t in steps]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(w, f, atol=1e-3) for w, f in zip(want, full))  # blocks really reused


# -- one stepper: streams, refs, sources ------------------------------------------------

def test_two_streams_each_get_the_outputs_of_an_independent_run():
    net, schedule = _Net(), _random_schedule(5, seed=1)
    a, b = _steps(5, seed=2), _steps(5, seed=3)
    fast = bcc.compile(net, schedule, backend="eager")
    got_a, got_b = [], []
    with torch.no_grad():
        for s, ((xa, ta), (xb, tb)) in enumerate(zip(a, b)):
            got_a.append(fast.bcc_call_at(StepRef(step=s, num_steps=5, stream=0), xa, ta))
            got_b.append(fast.bcc_call_at(StepRef(step=s, num_steps=5, stream=1), xb, tb))
    state = fast.bcc_stepper.state()
    assert [(s.stream, s.last_step) for s in state.streams] == [(0, 4), (1, 4)] and not state.in_trajectory
    for got, steps in ((got_a, a), (got_b, b)):
        alone = bcc.compile(net, schedule, backend="eager")
        with torch.no_grad():
            _exact(got, [alone(x, t) for x, t in steps])
        _exact(got, reference_outputs(net, schedule, [((x, t), {}) for x, t in steps]))


class _TwoCallsPerStep:
    """A step source like a true-CFG pipeline's: call k of step s is stream k."""

    def __init__(self):
        self.calls = 0

    def next_ref(self, num_steps):
        return StepRef(step=self.calls // 2 % num_steps, num_steps=num_steps, stream=self.calls % 2)

    def ran(self, ref):
        self.calls = (ref.step * 2 + ref.stream + 1) % (2 * ref.num_steps)

    def reset(self):
        self.calls = 0


def test_a_step_source_drives_plain_calls():
    schedule = Schedule(torch.tensor([[True, True], [False, True], [False, False]]), ["b0", "b1"])
    fast = bcc.compile(_Toy(), schedule, backend="eager")
    fast.bcc_stepper.source = _TwoCallsPerStep()
    a, b = [torch.full((2,), float(s + 1)) for s in range(3)], [torch.full((2,), -float(s)) for s in range(3)]
    t = torch.tensor(0.0)
    got_a, got_b = [], []
    for s in range(3):
        got_a.append(fast(a[s], t))
        got_b.append(fast(b[s], t))
    for got, xs in ((got_a, a), (got_b, b)):
        _exact(got, reference_outputs(_Toy(), schedule, [((x, t), {}) for x in xs]))
    with pytest.raises(BccError) as e:
        fast.bcc_stepper.source = object()
    assert e.value.code is ErrorCode.CONFIG_INVALID


def test_the_first_call_of_a_stream_recomputes_whatever_its_row_says():
    # Row 2 reuses both blocks; a trajectory entered there (img2img) has nothing cached.
    schedule = Schedule(torch.tensor([[True, True], [True, True], [False, False], [False, True]]), ["b0", "b1"])
    fast = bcc.compile(_Toy(), schedule, backend="eager")
    t = torch.tensor(0.0)
    x2, x3 = torch.full((2,), 2.0), torch.full((2,), 3.0)
    fast(torch.full((2,), 100.0), t)  # another trajectory's step 0 fills the caches ...
    fast.bcc_reset()  # ... then a new generation starts
    assert fast.bcc_call_at(StepRef(step=2, num_steps=4), x2, t).tolist() == [16.0, 16.0]  # 2 + 4 + 10: computed
    # Step 3 follows its row: b0 replays its residual from step 2 (4), b1 recomputes.
    assert fast.bcc_call_at(StepRef(step=3, num_steps=4), x3, t).tolist() == [17.0, 17.0]
    # A stream that joins late is fresh too (3 + 9 + 10), while stream 0 keeps its caches.
    assert fast.bcc_call_at(StepRef(step=3, num_steps=4, stream=1), x3, t).tolist() == [22.0, 22.0]


def test_a_step_ref_for_another_step_count_is_refused():
    fast = bcc.compile(Toy(), Schedule.every(2, 4, ["b0", "b1"]), backend="eager")
    x, t = torch.ones(2), torch.tensor(0.0)
    fast(x, t)
    with pytest.raises(BccError) as e:
        fast.bcc_call_at(StepRef(step=1, num_steps=5), x, t)
    assert e.value.code is ErrorCode.SCHEDULE_SHAPE
    assert "num_inference_steps" in str(e.value)
    assert fast.bcc_step == 0  # refused calls leave no half trajectory behind
    runner = bcc.ExportedDenoiser.from_program(bcc.export(Toy(), Schedule.every(2, 4, ["b0", "b1"]), ((x, t), {})))
    with pytest.raises(BccError) as e:
        runner.call_at(StepRef(step=0, num_steps=20), x, t)
    assert e.value.code is ErrorCode.SCHEDULE_SHAPE


def test_a_repeated_step_on_one_stream_is_refused_and_bad_refs_do_not_build():
    fast = bcc.compile(Toy(), Schedule.every(2, 4, ["b0", "b1"]), backend="eager")
    x, t = torch.ones(2), torch.tensor(0.0)
    fast.bcc_call_at(StepRef(step=0, num_steps=4), x, t)
    fast.bcc_call_at(StepRef(step=1, num_steps=4), x, t)
    with pytest.raises(BccError) as e:
        fast.bcc_call_at(StepRef(step=1, num_steps=4), x, t)
    assert e.value.code is ErrorCode.STEP_MISMATCH and "stream=1" in str(e.value)
    for bad in ({"step": 4, "num_steps": 4}, {"step": 0, "num_steps": 4, "stream": -1}, {"step": 0.5, "num_steps": 4}):
        with pytest.raises(BccError) as e:
            StepRef(**bad)
        assert e.value.code is ErrorCode.STEP_MISMATCH


def test_the_backend_graph_exposes_its_stepper():
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        graphs.append(bcc_backend(gm, example_inputs, **kwargs))
        return graphs[-1]

    schedule = Schedule.every(2, 3, ["b0", "b1"])
    fast = torch.compile(Toy(), backend=spy, fullgraph=True, dynamic=False,
                         options={"schedule": schedule, "backend": "eager"})
    x, t = torch.ones(2), torch.tensor(0.0)
    fast(x, t)
    (graph,) = graphs
    assert graph.block_names == ("b0", "b1") and graph.stepper.state().next_ref.step == 1
    assert [tuple(c.shape) for c in graph.stepper.caches()] == [(2,), (2,)]
    assert graph.signature.leaves[0].shape == (2,)
    graph.stepper.reset()
    assert graph.stepper.state().next_ref.step == 0


def test_a_late_start_and_a_second_stream_cost_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    schedule = Schedule(torch.tensor([[True, True], [False, True], [False, False]]), ["b0", "b1"])
    fast = bcc.compile(_Toy(), schedule, backend=counter)
    eager = bcc.compile(_Toy(), schedule, backend="eager")
    t = torch.tensor(0.0)
    calls = [StepRef(step=2, num_steps=3), StepRef(step=2, num_steps=3, stream=1)]  # forced full recompute
    calls += [StepRef(step=s, num_steps=3, stream=k) for s in range(3) for k in range(2)]  # scheduled rows
    for ref in calls:
        x = torch.full((2,), float(ref.step + 3 * ref.stream))
        torch.testing.assert_close(fast.bcc_call_at(ref, x, t), eager.bcc_call_at(ref, x, t))
    assert counter.frame_count == 1
