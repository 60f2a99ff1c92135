"""How a peer fares under ``torch.compile``: full graph or not, graphs, breaks, recompiles.

Apart from :mod:`bcc.tools.bench.peers` (the adapters), which it drives through their
public :func:`~bcc.tools.bench.peers.enable`.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from bcc.tools.bench.peers import INDUCTOR_OPTIONS, PeerSetting, enable, magcache_ratios

__all__ = ["compile_report"]


def _short(msg: Any, n: int = 160) -> str:
    """First line without the guard's source comment, ``._modules['x']`` as ``.x``; its end if long."""
    line = (str(msg).strip().splitlines() or [""])[0].split("  #")[0].rstrip()
    line = re.sub(r"(?:\.__dict__\['_modules'\]|\._modules)\['([^']+)'\]", r".\1", line)
    return line if len(line) <= n else "..." + line[3 - n:]


def compile_report(model: torch.nn.Module, setting: PeerSetting, run: Callable[[torch.nn.Module], torch.Tensor], *,
                   scheduler: Any, calibrate: Any = None, backend: str = "inductor",
                   regional: bool = False) -> dict[str, Any]:
    """How ``setting``'s peer fares under ``torch.compile``; ``run(denoiser)`` samples one
    short trajectory and returns its output. Calls ``torch._dynamo.reset()``. Keys:

    * ``fullgraph``, ``fullgraph_error``: does ``fullgraph=True`` get through a trajectory
      (traced with the ``eager`` backend: capture is the question, not codegen);
    * with breaks allowed (``backend``: ``"inductor"`` with ``layout_optimization=False``,
      or ``"eager"``/``"aot_eager"``, behind a graph-counting backend): ``graphs`` over
      one trajectory, ``graphs_per_call`` (cumulative), ``graphs_second_trajectory`` (0:
      nothing recompiles once warm), ``graph_ops`` (FX ops per graph), ``graph_breaks``
      and ``break_reasons``, ``recompiles`` and ``recompile_reasons`` (dynamo's),
      ``recompile_limit_hit`` (past it dynamo runs the frame and its callees eagerly);
    * ``max_abs_diff``, ``matches_eager``: compiled vs eager output; ``eager_executed_fraction``.

    ``regional=True`` measures ``enable(..., compile="regional")`` instead of the whole
    model. The peer runs with ``count=False``, so only its own code is traced.

    Example:
        >>> from bcc.tools import zoo
        >>> from bcc.tools.bench.peers import timestep_schedule
        >>> model, args, kwargs = zoo.build("pixart", latent=4)
        >>> sched = timestep_schedule(3)
        >>> def run(den):
        ...     return [den(args[0], **{**kwargs, "timestep": t.expand(2)})[0] for t in sched.timesteps][-1]
        >>> r = compile_report(model, PeerSetting("fbc", "FBC", {"threshold": 0.1}), run, scheduler=sched, backend="eager")
        >>> r["fullgraph"], r["graphs"] >= 1, r["matches_eager"]
        (False, True, True)
    """
    from torch._dynamo.utils import counters, clear_compilation_metrics, get_compilation_metrics

    if callable(calibrate) and setting.peer == "magcache" and "mag_ratios" not in setting.params:
        calibrate = magcache_ratios(model, scheduler, run)  # once, shared by the three runs below
    report: dict[str, Any] = {"peer": setting.peer, "label": setting.label, "backend": backend, "regional": regional}
    with torch.no_grad(), enable(model, setting, scheduler, calibrate=calibrate) as den:
        ref = run(den)
        report["eager_executed_fraction"] = den.executed_fraction()

    torch._dynamo.reset()
    try:
        with torch.no_grad(), enable(model, setting, scheduler, calibrate=calibrate, count=False,
                                     compile={"backend": "eager", "fullgraph": True, "regional": regional}) as den:
            run(den)
        report.update(fullgraph=True, fullgraph_error=None)
    except Exception as exc:  # noqa: BLE001 - the error is the measurement
        report.update(fullgraph=False, fullgraph_error=f"{type(exc).__name__}: {_short(exc)}")

    ops: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs):
        ops.append(sum(node.op.startswith("call_") for node in gm.graph.nodes))
        if backend == "inductor":
            return torch._inductor.compile(gm, example_inputs, options=dict(INDUCTOR_OPTIONS))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    per_call: list[int] = []  # graphs compiled so far, after each call
    with torch.no_grad(), enable(model, setting, scheduler, calibrate=calibrate, count=False,
                                 compile={"backend": counting, "regional": regional}) as den:
        den._on_call = lambda: per_call.append(len(ops))
        out = run(den)
        graphs, calls = len(ops), len(per_call)
        run(den)
    metrics = get_compilation_metrics()
    recompiles = [m.recompile_reason for m in metrics if m.recompile_reason]
    report.update(graphs=graphs, graphs_per_call=per_call[:calls], graphs_second_trajectory=len(ops) - graphs,
                  graph_ops=ops[:graphs], graph_breaks=int(sum(counters["graph_break"].values())),
                  break_reasons=sorted({_short(r, 100) for r in counters["graph_break"]})[:6],
                  recompiles=len(recompiles), recompile_reasons=sorted({_short(r, 100) for r in recompiles})[:6],
                  recompile_limit_hit=any("recompile limit" in (m.fail_reason or "") for m in metrics))
    out, ref = out.float(), ref.float()
    report.update(max_abs_diff=(out - ref).abs().max().item(), matches_eager=torch.allclose(out, ref, atol=1e-4, rtol=1e-4))
    torch._dynamo.reset()
    return report

