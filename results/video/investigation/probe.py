"""Probe one model through bcc: blocks found, then eager / inductor / backend="bcc" / specialize,
each with an all-True and a random schedule, compared against bcc's HookReference (eager hooks).

    python probe.py wan [--only eager,inductor] [--mode residual] [--blocks GLOB] [--steps 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bcc  # noqa: E402
from bcc.runtime.reference import HookReference  # noqa: E402

import models  # noqa: E402
import fixes  # noqa: E402

fixes.apply()


def chain(e: BaseException, n: int = 6) -> str:
    parts = []
    seen = set()
    while e is not None and id(e) not in seen and len(parts) < n:
        seen.add(id(e))
        msg = str(e).strip().splitlines()
        first = next((m for m in msg if m.strip()), "")
        parts.append(f"{type(e).__name__}: {first[:300]}")
        e = e.__cause__ or e.__context__
    return "  <-  ".join(parts)


def schedules(names, T, seed=0):
    allt = bcc.Schedule(torch.ones(T, len(names), dtype=torch.bool), tuple(names))
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(T, len(names), generator=g) < 0.5
    # neighbours disagree at least once: XOR a checkerboard into steps >= 1 where a row is uniform
    chk = (torch.arange(T)[:, None] + torch.arange(len(names))[None, :]) % 2 == 0
    for s in range(1, T):
        if m[s].all() or not m[s].any():
            m[s] = chk[s]
    m[0] = True
    return {"all": allt, "rand": bcc.Schedule(m, tuple(names))}


def reference(name, sched, mode, T):
    model, _, _ = models.build(name)
    ref = HookReference(model, sched, mode=mode)
    outs = []
    with torch.no_grad():
        for s in range(T):
            a, k = models.step_inputs(name, model, s)
            outs.append(model(*a, **k)[0])
    ref.remove()
    return outs


BLOCKS = None
IOPTS = None


def run_bcc(name, sched, how, mode, T):
    model, _, _ = models.build(name)
    outs = []
    if how == "backend":
        fast = torch.compile(model, backend="bcc", fullgraph=True, dynamic=False,
                             options={"schedule": (lambda names, s=sched: s), "blocks": BLOCKS, "mode": mode,
                                      **({"inductor_options": IOPTS} if IOPTS is not None else {})})
        # a schedule *function*: two torch.compile(backend="bcc", options={"schedule": Schedule}) in one
        # process fail in Dynamo's guard-failure report (Schedule.__eq__ compares mask tensors: "Boolean
        # value of Tensor ... is ambiguous"), a side bug noted in notes.md
    else:
        opts = {"eager": dict(backend="eager"), "inductor": {}, "specialize": dict(strategy="specialize"),
                "specialize-eager": dict(strategy="specialize", backend="eager")}[how]
        if IOPTS is not None and opts.get("backend") != "eager":
            opts["inductor_options"] = IOPTS
        fast = bcc.compile(model, sched, mode=mode, **opts)
    with torch.no_grad():
        for s in range(T):
            a, k = models.step_inputs(name, model, s)
            outs.append(fast(*a, **k)[0])
    return outs, fast


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--only", default="eager,inductor,backend,specialize")
    p.add_argument("--mode", default="residual")
    p.add_argument("--blocks", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sched", default="all,rand")
    p.add_argument("--tb", action="store_true")
    p.add_argument("--inductor-options", default=None, help="JSON, replaces bcc's DEFAULT_INDUCTOR_OPTIONS")
    a = p.parse_args()
    T = a.steps
    global IOPTS
    if a.inductor_options:
        import json
        IOPTS = json.loads(a.inductor_options)
    model, args, kwargs = models.build(a.name)
    t0 = time.time()
    global BLOCKS
    sel = a.blocks.split(",") if a.blocks else "attention"
    BLOCKS = sel
    try:
        names = bcc.find_blocks(model, (args, kwargs), blocks=sel)
    except Exception as e:
        print(f"[{a.name}] find_blocks FAILED: {chain(e)}")
        if a.tb:
            traceback.print_exc()
        return
    mods = dict(model.named_modules())
    print(f"[{a.name}] {len(names)} blocks ({time.time() - t0:.1f}s):",
          ", ".join(f"{n} ({type(mods[n]).__name__})" for n in names))
    scheds = schedules(names, T)
    print("  rand schedule:", scheds["rand"].mask.int().tolist())
    for kind in a.sched.split(","):
        sched = scheds[kind]
        ref = reference(a.name, sched, a.mode, T)
        for how in a.only.split(","):
            t0 = time.time()
            try:
                outs, _ = run_bcc(a.name, sched, how, a.mode, T)
                err = max(float((o - r).abs().max()) for o, r in zip(outs, ref))
                tag = "ok  " if err < 1e-4 else "WRONG"
                print(f"  {kind:4s} {how:10s} {tag} max|bcc-ref| {err:.2e}  ({time.time() - t0:.1f}s)")
            except Exception as e:
                print(f"  {kind:4s} {how:10s} FAIL {chain(e)}  ({time.time() - t0:.1f}s)")
                if a.tb:
                    traceback.print_exc()
            sys.stdout.flush()


if __name__ == "__main__":
    main()
