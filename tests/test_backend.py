"""The torch.compile door: backend="bcc" by name, same results as bcc.compile, clear refusals."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bcc
from bcc import Schedule

from testing import Toy, built, changing_schedule, run, trajectory_inputs


def _compile(model, schedule, **options):
    return torch.compile(model, backend="bcc", fullgraph=True, dynamic=False,
                         options={"schedule": schedule, **options})


def _code(excinfo) -> str:
    # Dynamo wraps a backend's exception (BackendCompilerFailed); the BccError is its cause.
    err = excinfo.value
    while err is not None and not isinstance(err, bcc.BccError):
        err = err.__cause__ or err.__context__
    assert err is not None, f"no BccError in {excinfo.value!r}"
    return err.code.value


def test_backend_by_name_in_a_fresh_process_without_importing_bcc(tmp_path):
    Schedule(torch.tensor([[True, True], [False, True]]), ["b0", "b1"]).save(tmp_path / "s.json")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)

        class Double(torch.nn.Module):
            def forward(self, x):
                return x * 2

        class Toy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.b0, self.b1 = Double(), Double()
            def forward(self, x):
                return self.b1(self.b0(x))

        assert "bcc" not in sys.modules
        # torch resolves the name through bcc's torch_dynamo_backends entry point.
        fast = torch.compile(Toy(), backend="bcc", fullgraph=True, dynamic=False,
                             options={{"schedule": {str(tmp_path / "s.json")!r}, "mode": "output",
                                       "backend": "eager"}})
        a = fast(torch.ones(3))        # step 0: 4
        b = fast(torch.full((3,), 3.0))  # step 1: b0 replays its output 2 (not 6), b1 doubles -> 4
        assert "bcc" in sys.modules and "bcc" in torch._dynamo.list_backends()
        print(a.tolist(), b.tolist())
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[4.0, 4.0, 4.0] [4.0, 4.0, 4.0]"


def test_backend_equals_bcc_compile_over_two_trajectories():
    model, args, kwargs = built("unet-tiny")
    schedule = changing_schedule(6, bcc.find_blocks(model, (args, kwargs)))
    inputs = trajectory_inputs("unet-tiny", model, 6)
    fast = _compile(model, schedule)
    got = run(fast, inputs) + run(fast, inputs)
    ref = bcc.compile(model, schedule, backend="eager")
    want = run(ref, inputs) + run(ref, inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not torch.equal(want[1], run(model, inputs[1:2])[0])  # step 1 really reuses


def test_backend_names_dit_blocks_like_bcc_compile():
    model, args, kwargs = built("dit")
    names = bcc.find_blocks(model, (args, kwargs))
    schedule = Schedule(torch.tensor([[True] * len(names), [False, True] + [False] * (len(names) - 2)]), names)
    inputs = trajectory_inputs("dit", model, 2)
    got = run(_compile(model, schedule, backend="eager"), inputs)
    want = run(bcc.compile(model, schedule, backend="eager"), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_schedule_function_and_output_mode():
    toy = Toy()
    fast = _compile(toy, lambda names: Schedule.every(2, 2, names), blocks=["b0", "b1"], mode="output",
                    backend="eager")
    x, t = torch.ones(2), torch.tensor(1.0)
    assert fast(x, t).tolist() == [13.0, 13.0]
    assert fast(3 * x, t).tolist() == [13.0, 13.0]  # both blocks replay their whole outputs


@pytest.mark.parametrize("options", [None, {}, {"schedule": 3}, {"schedule": Schedule.every(2, 2, ["b0"]), "bogus": 1},
                                     {"schedule": Schedule.every(2, 2, ["b0"]), "backend": "aot_eager"}])
def test_options_that_are_not_a_schedule_are_refused(options):
    fast = torch.compile(Toy(), backend="bcc", dynamic=False, **({} if options is None else {"options": options}))
    with pytest.raises(Exception) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) == "BCC701"


def test_regional_compile_is_refused():
    toy = Toy()
    toy.b0.compile(backend="bcc", dynamic=False, options={"schedule": Schedule.every(2, 2, ["b0", "b1"])})
    with pytest.raises(Exception) as e:
        toy(torch.ones(2), torch.tensor(1.0))
    assert _code(e) == "BCC702"
    assert "regional compile" in str(e.value)


class _Broken(Toy):
    def forward(self, x, t):
        h = self.b0(x)
        torch._dynamo.graph_break()
        return self.b1(h) + t


def test_graph_break_between_blocks_is_refused():
    fast = torch.compile(_Broken(), backend="bcc", dynamic=False,
                         options={"schedule": Schedule.every(2, 2, ["b0", "b1"]), "backend": "eager"})
    with pytest.raises(Exception) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) == "BCC702"
    assert "graph break" in str(e.value)


def test_schedule_for_another_model_is_refused():
    fast = _compile(Toy(), Schedule.every(2, 2, ["down_blocks.0.attentions.0"]), backend="eager")
    with pytest.raises(Exception) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) == "BCC702"


def test_symbolic_shapes_are_refused():
    fast = torch.compile(Toy(), backend="bcc", dynamic=True,
                         options={"schedule": Schedule.every(2, 2, ["b0", "b1"]), "backend": "eager"})
    with pytest.raises(Exception) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) == "BCC703"
