"""GPU-ready by construction, checked without a GPU.

The model, its inputs and bcc's caches go on a *fake* CUDA device (``FakeTensorMode``:
shapes, dtypes and devices without data or kernels) while bcc keeps the schedule and the
step on the CPU, as it does on a real GPU. A trajectory that runs there has no device
mismatch (fake tensors raise on one, as CUDA would) and no device-to-host read (a fake
tensor has no value to read). On top, the recorder below sees every ``torch.cond``
predicate and every op's devices. The inductor test reads the wrapper code of a CPU
run: every branch predicate is a 0-d host buffer read once with ``.item()``.

The last test is the CPU dry run of ``examples/gpu_check.py``: every section runs and
writes its results.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

import bcc
from bcc import BccConfig, BccError, ErrorCode, Schedule, ScaleShift
from bcc.lower.compile import RowDispatch
from testing import Toy

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


class _FakeCuda(TorchFunctionMode):
    """Tensors made on (or moved to) ``cuda`` are fake; CPU tensors stay real.

    A CPU-only torch cannot run ``Tensor.to("cuda")`` even on a fake tensor (its Python
    binding asks for the CUDA device guard first), so moves go through
    ``aten._to_copy``, which fake mode handles. Records the device of every ``cond``
    predicate and the devices of every op's tensor arguments.
    """

    def __init__(self):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.predicates: list[torch.device] = []
        self.mixed: list[str] = []

    @staticmethod
    def _is_cuda(device) -> bool:
        return device is not None and torch.device(device).type == "cuda"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.higher_order.cond:
            self.predicates.append(args[0].device)
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            device = "cuda" if func is torch.Tensor.cuda else kwargs.get(
                "device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if self._is_cuda(device):
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), args[0].dtype))
                with self.fake:
                    return torch.ops.aten._to_copy.default(args[0], device=CUDA, dtype=dtype)
        self._check_devices(func, args)
        if self._is_cuda(kwargs.get("device")):
            with self.fake:
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _check_devices(self, func, args) -> None:
        # A CUDA op may take 0-d CPU scalars; any other CPU tensor beside a CUDA one is a
        # mismatch (or a hidden copy) on a GPU.
        if getattr(func, "__name__", "_").startswith("_"):  # module plumbing (e.g. a type check in .to())
            return
        tensors = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cuda" for t in tensors) and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.mixed.append(str(func))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + self.lin(x)


class _Net(torch.nn.Module):
    """Two residual blocks with weights, so weights, caches and tables all have a device."""

    def __init__(self):
        super().__init__()
        self.a = _Block()
        self.b = _Block()

    def forward(self, x, t):
        return self.b(self.a(x)) * t


STEPS = 4
SCHEDULE = Schedule(torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.bool), ["a", "b"])


def _scale_shift():
    """Non-identity table corrections for SCHEDULE's slots (found by a CPU probe)."""
    probe = bcc.compile(_Net(), SCHEDULE, backend="eager")
    probe(torch.ones(2, 4), torch.tensor(1.0))
    ss = ScaleShift.for_graph(SCHEDULE, probe.bcc_slots())
    with torch.no_grad():
        for table in ss.table:
            table.fill_(0.25)
    return ss


def _fake_cuda_call():
    """A net and its call on fake CUDA; weights frozen (export traces ``cond`` without autograd)."""
    net = _Net().to("cuda").requires_grad_(False)
    return net, torch.empty(2, 4, device="cuda"), torch.empty((), device="cuda")


def _assert_on_cuda(tensors):
    assert tensors and all(isinstance(c, FakeTensor) and c.device == CUDA for c in tensors), \
        [(type(c).__name__, c.device) for c in tensors]


@pytest.mark.parametrize("scale_shift", [False, True], ids=["naive", "scale_shift"])
def test_branch_graph_on_fake_cuda_reads_predicates_on_the_host(scale_shift):
    ss = _scale_shift() if scale_shift else None
    with _FakeCuda() as mode:
        net, x, t = _fake_cuda_call()
        model = bcc.compile(net, SCHEDULE, backend="eager", scale_shift=ss)
        outs = [model(x, t) for _ in range(STEPS)]
        caches = model.bcc_stepper.caches()
        tables = ss.tables_for(model.bcc_slots()) if ss is not None else []
    _assert_on_cuda(outs)
    _assert_on_cuda(caches)
    assert mode.predicates == [torch.device("cpu")] * (STEPS * 2)
    assert mode.mixed == []
    if ss is not None:
        _assert_on_cuda(tables)
        # The graph takes this step's rows: no table is indexed (by the CPU step or otherwise).
        gm = model.bcc_graph()
        tables_in = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("bcc_ss_")]
        assert len(tables_in) == 2
        assert not any(u.target is torch.ops.aten.index_select.default for n in tables_in for u in n.users)


def test_specialized_rows_on_fake_cuda_have_no_branch_and_device_caches():
    ss = _scale_shift()
    with _FakeCuda() as mode:
        net, x, t = _fake_cuda_call()
        model = bcc.compile(net, SCHEDULE, backend="eager", strategy="specialize", scale_shift=ss)
        outs = [model(x, t) for _ in range(STEPS)]
        caches = model.bcc_stepper.caches()
    _assert_on_cuda(outs)
    _assert_on_cuda(caches)
    assert mode.predicates == [] and mode.mixed == []
    assert model.bcc_stats()["graphs"] == 4  # SCHEDULE's four distinct rows


def test_export_on_fake_cuda_keeps_schedule_and_step_on_the_host():
    ss = _scale_shift()
    with _FakeCuda() as mode:
        net, x, t = _fake_cuda_call()
        ep = bcc.export(net, SCHEDULE, ((x, t), {}), scale_shift=ss)
        run = bcc.ExportedDenoiser.from_program(ep)
        outs = [run(x, t) for _ in range(STEPS)]
        caches = run.stepper.caches()
    devices = {n.name: n.meta["val"].device for n in ep.graph.nodes if n.op == "placeholder"}
    assert devices["bcc_schedule"] == devices["bcc_step"] == torch.device("cpu")
    # The baked tables are indexed by the step on their own device, never by the CPU step.
    assert devices["bcc_ss_step"] == CUDA
    assert {d for k, d in devices.items() if k.startswith("bcc_cache_")} == {CUDA}
    _assert_on_cuda(outs)
    _assert_on_cuda(caches)
    assert mode.mixed == []
    assert ep.graph_module.meta["bcc_export"].slots[0]["device"] == "cuda:0"


def test_format_2_metadata_still_loads_with_caches_where_the_inputs_are(tmp_path):
    x, t = torch.ones(2, 4), torch.tensor(2.0)
    net = _Net()
    path = bcc.save_exported(bcc.export(net, SCHEDULE, ((x, t), {})), tmp_path / "net.pt2")
    meta = tmp_path / "net.bcc.json"
    payload = json.loads(meta.read_text())
    assert payload["version"] == 3 and payload["slots"][0]["device"] == "cpu"
    # Format 2 recorded no cache device: the caches go where the recorded inputs are.
    old = {**payload, "version": 2, "slots": [{k: v for k, v in s.items() if k != "device"} for s in payload["slots"]]}
    meta.write_text(json.dumps(old))
    runner = bcc.load_exported(path)
    fast = bcc.compile(net, SCHEDULE, backend="eager")
    want = [fast(x * (s + 1), t) for s in range(STEPS)]
    for s in range(STEPS):
        torch.testing.assert_close(runner(x * (s + 1), t), want[s], rtol=0, atol=0)
    assert [c.device.type for c in runner.stepper.caches()] == ["cpu", "cpu"]


def test_exported_scale_shift_matches_compiled_scale_shift_on_cpu():
    ss = _scale_shift()
    net, t = _Net(), torch.tensor(2.0)
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]
    fast = bcc.compile(net, SCHEDULE, backend="eager", scale_shift=ss)
    want = [fast(x, t) for x in xs]
    run = bcc.ExportedDenoiser.from_program(bcc.export(net, SCHEDULE, ((xs[0], t), {}), scale_shift=ss))
    got = [run(x, t) for x in xs]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_inductor_reads_every_branch_predicate_from_a_host_buffer():
    from torch._inductor.utils import run_and_get_code

    model = bcc.compile(_Net(), SCHEDULE)
    x, t = torch.randn(2, 4), torch.tensor(2.0)
    with torch.no_grad():
        _, codes = run_and_get_code(lambda: [model(x, t) for _ in range(STEPS)])
    assert len(codes) == 1  # one graph for every step
    code = codes[0]
    reads = re.findall(r"^\s*if (\w+)\.item\(\):", code, flags=re.M)
    assert len(reads) == 2  # one per gated block
    for buf in reads:
        # Its own 0-d bool buffer, made on the host and filled by a CPU kernel from the
        # CPU schedule and step: reading it is no device sync on a GPU.
        assert re.search(rf"^\s*{buf} = empty_strided_cpu\(\(\), \(\), torch\.bool\)", code, flags=re.M), buf
    assert code.count(".item()") == len(reads)  # no other host read
    assert "empty_strided_cuda(" not in code and ".cpu()" not in code  # nothing made on, or copied off, a device


def test_cuda_graphs_with_the_branch_graph_are_refused():
    graphs = {"triton.cudagraphs": True}
    with pytest.raises(BccError, match=r"BCC705.*strategy='specialize'") as e:
        RowDispatch.check_strategy(BccConfig(inductor_options=graphs))
    assert e.value.code is ErrorCode.CUDA_GRAPHS_BRANCH
    RowDispatch.check_strategy(BccConfig(inductor_options=graphs, strategy="specialize"))
    RowDispatch.check_strategy(BccConfig())


def test_cuda_graphs_with_the_branch_graph_are_refused_at_every_entry_point():
    net, schedule = Toy(), Schedule.every(2, 2, ["b0", "b1"])
    x, t = torch.ones(2, 3), torch.tensor(1.0)
    fast = bcc.compile(net, schedule, inductor_options={"triton.cudagraphs": True})
    with pytest.raises(BccError, match="BCC705"):
        fast(x, t)
    backend = torch.compile(net, backend="bcc", dynamic=False, options={
        "schedule": schedule, "inductor_options": {"triton.cudagraphs": True}})
    with pytest.raises(Exception) as e:
        backend(x, t)
    assert "BCC705" in str(e.value)


def test_specialize_with_cuda_graphs_keeps_caches_in_static_buffers():
    """The CUDA-graph form of ``strategy="specialize"`` on the CPU (``aot_eager`` takes the
    inductor options and ignores them): caches stay at one address for the whole
    trajectory (what a CUDA graph reads in place), outputs are fresh tensors, values exact."""
    net = _Net()
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(s)) for s in range(STEPS)]
    t = torch.tensor(2.0)
    eager = bcc.compile(net, SCHEDULE, backend="eager")
    want = [eager(x, t) for x in xs]
    model = bcc.compile(net, SCHEDULE, strategy="specialize", backend="aot_eager",
                        inductor_options={"triton.cudagraphs": True})
    got, addresses = [], set()
    with torch.no_grad():
        for x in xs:
            got.append(model(x, t))
            addresses.add(tuple(c.data_ptr() for c in model.bcc_stepper.caches()))
        got.append(model(xs[0], t))  # a second trajectory reuses the same buffers
        addresses.add(tuple(c.data_ptr() for c in model.bcc_stepper.caches()))
    assert len(addresses) == 1
    for g, w in zip(got, want + want[:1]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len({o.data_ptr() for o in got}) == len(got)


# A plain checkout (no bcc installed, as on the GPU machine): the editable install's finder is dropped.
_AS_FROM_A_CHECKOUT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                       "str(getattr(f, '__module__', type(f).__module__))]; sys.argv = sys.argv[1:]; "
                       "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # aot_eager: every section's code runs, without inductor's compile times (the
    # inductor dry run is the same command without --backend).
    cmd = [sys.executable, "-c", _AS_FROM_A_CHECKOUT, str(ROOT / "examples" / "gpu_check.py"), "--device", "cpu",
           "--tiny", "--backend", "aot_eager", "--budget-s", "300", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    assert (tmp_path / "gpu_results.md").read_text().startswith("# GPU check on cpu")
    sections = results["sections"]
    # bcc came from this checkout (recorded relative to it: results carry no machine paths).
    assert sections["setup"]["bcc"] == "bcc"
    assert {k.split(":")[-1] for k in sections} >= {"setup", "numerics", "branch", "specialize", "cudagraphs"}
    failed = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if v.get("error") or v.get("skipped")}
    assert failed == {}, failed
    variants = [v for s in sections.values() for v in s.values() if isinstance(v, dict)]
    assert [v["error"] for v in variants if "error" in v] == []
    numerics = sections["pixart/float32:numerics"]
    assert numerics["bcc_all_true_vs_plain_eager"] < 1e-5 and numerics["bcc_eager_rewrite_vs_plain_eager"] < 1e-5
    assert sections["pixart/float32:cudagraphs"]["branch_refused"].startswith("[BCC705]")
