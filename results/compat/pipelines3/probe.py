"""Probe bcc (backend="eager") inside real diffusers video pipelines (LTX-2, SkyReels-V2, Wan VACE, ...),
against the independent pipeline caching reference of tests/pipelines.py.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python probe.py [ltx2 skyreels2 wanvace ...]
Writes runs/<name>.json per pipeline and merges them into results.json.

Flows (output_type="latent", torch.equal on every latent output; LTX-2: video and audio):
  a_6_7_6        6, 7, 6 steps on one compiled pipeline vs the reference following its schedules
  b_two_calls    more than one denoiser call per step (LTX-2: modality isolation; + b_three_calls: CFG+STG+modality;
                 SkyReels/Wan: CFG with negative embeddings)
  c_interrupt    interrupt at step 2, then full 6- and 7-step generations
  d_calibrate    bcc.calibrate(pipe, [None], prompt_embeds=...): one row per scheduler step; its plan vs reference
  e_all_compute  plain pipeline vs bcc with Schedule.all_compute(T, names) (bcc must not disturb the pipeline)

Reference: `Reference` = P.PipelineCachingReference plus an instance `__deepcopy__` on the wrapped scheduler so
that a deep copy (LTX-2's audio scheduler) is a plain, unwrapped scheduler. Without it, the copy carries the
reference's wrappers (functions are deep-copied by reference), which step the *original* scheduler: flow a also
records what the unpatched reference gives for LTX-2 (`ref_unpatched`).
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
import builders as B  # noqa: E402
import pipelines as P  # noqa: E402

import bcc  # noqa: E402
from bcc import BccError  # noqa: E402

STEPS = 6
RUNS = HERE / "runs"


def stream_inputs(forward, args, kwargs):
    """P.stream_inputs plus `audio_hidden_states` (LTX-2's second latent stream; the tests' reference only
    knows `hidden_states` and `encoder_hidden_states`, so it would cache LTX-2's audio output whole)."""
    import inspect
    streams = P.stream_inputs(forward, args, kwargs)
    audio = inspect.signature(forward).bind(*args, **kwargs).arguments.get("audio_hidden_states")
    if isinstance(audio, torch.Tensor):
        streams.insert(1, audio)
    return streams


def _block_with_audio(self, index: int, forward):
    """P.PipelineCachingReference._block verbatim, with this file's stream_inputs."""
    import torch.utils._pytree as pytree

    def wrapped(*args, **kwargs):
        cur = self.current
        if cur is None:
            return forward(*args, **kwargs)
        key = (cur["stream"], index)
        override = self.base_override.get(self.blocks[index][1])
        if override is not None:  # explicit (input names per output; None: cached whole)
            import inspect
            bound = inspect.signature(forward).bind(*args, **kwargs).arguments
            names = [n for n in override if n is not None]
            streams = [bound[n] for n in names]
        else:
            streams = stream_inputs(forward, args, kwargs)
        shapes = [tuple(x.shape) for x in streams]
        entry = self.caches.get(key)
        if not cur["row"][index] and entry is not None and entry[0] != shapes:
            if self.on_shape_change == "error":
                raise RuntimeError(f"block {self.blocks[index]}, stream {cur['stream']}: input shapes changed "
                                   f"within a generation ({entry[0]} -> {shapes})")
            entry = None
        if cur["row"][index] or entry is None:
            out = forward(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)
            bases = ([None if n is None else names.index(n) for n in override] if override is not None
                     else P.residual_bases(leaves, streams))
            cached = [None if not isinstance(v, torch.Tensor)
                      else (v - streams[b] if b is not None else v.clone()).detach()
                      for v, b in zip(leaves, bases)]
            consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
            self.caches[key] = (shapes, spec, consts, bases, cached)
            self.bases_seen[self.blocks[index][1]] = bases
            cur["recomputed"].append(index)
            return out
        _shapes, spec, consts, bases, cached = entry
        leaves = list(consts)
        for j, (c, b) in enumerate(zip(cached, bases)):
            if c is not None:
                leaves[j] = streams[b] + c if b is not None else c.clone()
        return pytree.tree_unflatten(leaves, spec)

    return wrapped


class Reference(P.PipelineCachingReference):
    """The tests' reference, with (1) deep copies of the followed scheduler made plain (unwrapped) and
    (2) `audio_hidden_states` as a stream input (see stream_inputs)."""

    _block = _block_with_audio

    def __init__(self, pipe, schedule, blocks=None, base_override=None, **kw):
        self.base_override = dict(base_override or {})
        super().__init__(pipe, schedule, blocks, **kw)

    def _install(self):
        self.bases_seen = {}
        super()._install()
        sched = self.scheduler
        wrapped = ("set_timesteps", "set_begin_index", "step")

        def plain_deepcopy(memo):
            attrs = vars(sched)
            saved = {n: attrs.pop(n) for n in (*wrapped, "__deepcopy__") if n in attrs}
            try:
                return copy.deepcopy(sched, memo)
            finally:
                attrs.update(saved)
        sched.__deepcopy__ = plain_deepcopy
        self.copies_made_plain = True
        self._undo.append(lambda: vars(sched).pop("__deepcopy__", None))


# -- helpers (as in tests/test_pipelines.py) -----------------------------------------------
def plan_for(pipe, steps=(STEPS, 9), budget=0.6):
    names = list(dict.fromkeys(name for _attr, name in B.blocks_of(NAME, pipe)))
    profiles = []
    for T in steps:
        l1 = torch.rand(T, len(names), generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        l1[0] = 0
        profiles.append(bcc.ChangeProfile(l1, names))
    return bcc.Plan(tuple(profiles), budget=budget)


def rows_of(fast, ref_pipe):
    blocks = B.blocks_of(NAME, ref_pipe)

    def row(step, num_steps):
        out = []
        for attr, name in blocks:
            s = getattr(fast, attr).bcc_schedule_for(num_steps)
            out.append(bool(s.mask[step, s.block_names.index(name)]))
        return out
    return row


def rows_of_blocks(fast, blocks):
    def row(step, num_steps):
        out = []
        for attr, name in blocks:
            s = getattr(fast, attr).bcc_schedule_for(num_steps)
            out.append(bool(s.mask[step, s.block_names.index(name)]))
        return out
    return row


def compare(got: list, want: list) -> dict:
    res = {"equal": True, "max_abs": 0.0, "parts": []}
    for g, w in zip(got, want):
        if g.shape != w.shape:
            res["equal"] = False
            res["parts"].append({"shape": [list(g.shape), list(w.shape)]})
            continue
        d = float((g.double() - w.double()).abs().max())
        eq = bool(torch.equal(g, w))
        res["parts"].append({"equal": eq, "max_abs": d, "rel": d / max(float(w.abs().max()), 1e-30)})
        res["equal"] &= eq
        res["max_abs"] = max(res["max_abs"], d)
    if len(got) != len(want):
        res["equal"] = False
    return res


def frames(exc):
    tb = traceback.extract_tb(exc.__traceback__)
    inner = {}
    for f in tb:
        for key, marker in (("bcc", "bcc/"), ("torch", "/site-packages/torch/"),
                            ("diffusers", "/site-packages/diffusers/")):
            if marker in f.filename:
                inner[key] = f"{f.filename.split('site-packages/')[-1].replace('', '')}:{f.lineno} in {f.name}"
    return inner


def error_record(exc) -> dict:
    chain, e = [], exc
    while e is not None and len(chain) < 4:
        chain.append(f"{type(e).__name__}: {str(e)[:600]}")
        e = e.__cause__ or e.__context__
    return {"error": type(exc).__name__, "bcc_error": isinstance(exc, BccError),
            "code": getattr(getattr(exc, "code", None), "value", None), "message": str(exc)[:1500],
            "chain": chain, "frames": frames(exc),
            "traceback_tail": "".join(traceback.format_exception(exc))[-3000:]}


class Flow:
    def __init__(self, rec, key):
        self.rec, self.key = rec, key
        self.out = rec.setdefault(key, {"checks": []})

    def __enter__(self):
        self.t0 = time.time()
        return self.out

    def __exit__(self, et, ev, tb):
        self.out["seconds"] = round(time.time() - self.t0, 1)
        if ev is not None:
            self.out["status"] = "error"
            self.out.update(error_record(ev))
            print(f"  [{self.key}] ERROR {type(ev).__name__}: {str(ev)[:300]}", flush=True)
        else:
            ok = all(c.get("equal", c.get("ok", True)) for c in self.out["checks"])
            self.out.setdefault("status", "equal" if ok else "differs")
            md = max([c.get("max_abs", 0.0) for c in self.out["checks"]] or [0.0])
            print(f"  [{self.key}] {self.out['status']} max_abs={md:.3g} ({self.out['seconds']}s)", flush=True)
        return True  # record and go on


def check(out, label, got, want, **extra):
    c = {"label": label, **compare(got, want), **extra}
    out["checks"].append(c)
    return c


def trace_summary(ref):
    return [(g, s, n, k, list(r)) for g, s, n, k, _a, r in ref.trace]


def _stats(fast):
    try:
        s = fast.transformer.bcc_stats()
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in s.items()}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


NAME = None


def probe(name: str) -> dict:
    global NAME
    NAME = name
    build = B.BUILDERS[name]
    rec: dict = {"pipeline": name}
    ws: list[str] = []
    showwarning = warnings.showwarning

    def capture_warning(message, category, *a, **k):
        if category.__name__ == "BccWarning":
            ws.append(str(message)[:600])
    warnings.showwarning = capture_warning
    warnings.simplefilter("always")

    def gen(pipe, steps=STEPS, **kw):
        return B.generate(name, pipe, steps, **kw)

    t_build = time.time()
    plain = build(0)
    rec["class"] = type(plain).__name__
    rec["denoiser"] = type(plain.transformer).__name__
    rec["scheduler"] = type(plain.scheduler).__name__
    rec["default_blocks (reference)"] = [n for _a, n in B.blocks_of(NAME, plain)]
    plain_out = gen(plain)
    rec["output_shapes"] = [list(t.shape) for t in plain_out]
    rec["build_and_plain_s"] = round(time.time() - t_build, 1)
    calls = []
    h = plain.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    gen(plain, 3)
    rec["denoiser_calls_3_steps_default"] = len(calls)
    h.remove()

    # a: 6, 7, 6 steps ------------------------------------------------------------------
    with Flow(rec, "a_6_7_6") as out:
        fast = bcc.compile(build(0), plan_for(plain), backend="eager")
        out["compiled_type"] = type(fast.transformer).__name__
        ref_pipe = build(0)
        with Reference(ref_pipe, rows_of(fast, ref_pipe), B.blocks_of(name, ref_pipe)) as ref:
            for steps in (STEPS, 7, STEPS):
                got = gen(fast, steps)
                out.setdefault("schedule_block_names", list(fast.transformer.bcc_schedule_for(steps).block_names))
                check(out, f"{steps} steps", got, gen(ref_pipe, steps))
        out["reference_residual_bases"] = ref.bases_seen
        tr = trace_summary(ref)
        out["steps_seen_by_reference"] = [(s, n) for _g, s, n, _k, _r in tr]
        out["steps_ok"] = out["steps_seen_by_reference"] == [(s, n) for n in (STEPS, 7, STEPS) for s in range(n)]
        out["blocks_reused"] = any(len(r) != len(ref.blocks) for *_x, r in tr)
        again = gen(fast, STEPS)
        out["moves_output_vs_plain"] = compare(again, plain_out)
        out["stats"] = _stats(fast)
        try:
            out["bcc_slots"] = str(fast.transformer.bcc_slots())[:3000]
        except Exception as e:  # noqa: BLE001
            out["bcc_slots"] = f"{type(e).__name__}: {e}"
        out["masks"] = {T: fast.transformer.bcc_schedule_for(T).mask.int().tolist() for T in (STEPS, 7)}
        fresh = bcc.compile(build(0), fast.transformer.bcc_plan, backend="eager")
        check(out, "next generation vs freshly compiled", again, gen(fresh, STEPS))
        if not out["steps_ok"]:
            out["checks"].append({"label": "reference step trace", "ok": False})
        if name == "ltx2":  # what the tests' reference, unpatched, makes of LTX-2's scheduler copy
            ref_pipe2 = build(0)
            try:
                with P.PipelineCachingReference(ref_pipe2, rows_of(fast, ref_pipe2), B.blocks_of(name, ref_pipe2)) as ref2:
                    un = gen(ref_pipe2, STEPS)
                out["ref_unpatched"] = {"vs_bcc": compare(gen(fast, STEPS), un),
                                        "steps_seen": [(s, n) for _g, s, n, _k, _r in trace_summary(ref2)],
                                        "generations_counted": ref2.generation}
            except Exception as e:  # noqa: BLE001
                out["ref_unpatched"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}

    # b: more than one call per step -----------------------------------------------------------
    for key, kw in (("b_two_calls", B.two_calls(name)), ("b_three_calls", B.more_calls(name))):
        if kw is None:
            continue
        with Flow(rec, key) as out:
            out["kwargs"] = {k: (list(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            fast_b = bcc.compile(build(0), plan_for(plain), backend="eager")
            ref_pipe = build(0)
            with Reference(ref_pipe, rows_of(fast_b, ref_pipe), B.blocks_of(name, ref_pipe)) as ref:
                for steps in (STEPS, 7):
                    check(out, f"{steps} steps", gen(fast_b, steps, **kw), gen(ref_pipe, steps, **kw))
                check(out, f"{STEPS} steps, one call per step, after", gen(fast_b, STEPS), gen(ref_pipe, STEPS))
            tr = trace_summary(ref)
            out["max_stream"] = max(k for _g, _s, _n, k, _r in tr)
            out["stats"] = _stats(fast_b)
            want_streams = 2 if key == "b_two_calls" else 3
            if out["max_stream"] != want_streams - 1:
                out["checks"].append({"label": f"{want_streams} streams ran", "ok": False})
            fresh = bcc.compile(build(0), plan_for(plain), backend="eager")
            check(out, "next multi-call generation vs freshly compiled", gen(fast_b, STEPS, **kw),
                  gen(fresh, STEPS, **kw))
            check(out, "multi-call all-compute vs plain",
                  gen(bcc.compile(build(0), bcc.Schedule.all_compute(STEPS, rec["default_blocks (reference)"]),
                                  backend="eager"), STEPS, **kw), gen(build(0), STEPS, **kw))

    # c: interrupt at step 2 ------------------------------------------------------------
    with Flow(rec, "c_interrupt") as out:
        fast_c = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with Reference(ref_pipe, rows_of(fast_c, ref_pipe), B.blocks_of(name, ref_pipe)) as ref:
            check(out, "interrupted at 2", gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2)),
                  gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2)))
            for steps in (STEPS, 7):
                check(out, f"then {steps} steps", gen(fast_c, steps), gen(ref_pipe, steps))
            kw = B.two_calls(name)
            if kw:
                check(out, "interrupted at 2, two calls",
                      gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2), **kw),
                      gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2), **kw))
                check(out, "then 6 steps two calls", gen(fast_c, STEPS, **kw), gen(ref_pipe, STEPS, **kw))
        out["first_generation_steps"] = [s for g, s, *_r in trace_summary(ref) if g == 1]
        if out["first_generation_steps"] != [0, 1, 2]:
            out["checks"].append({"label": "interrupted generation ran steps 0,1,2", "ok": False})

    # d: calibrate ----------------------------------------------------------------------
    variants = [("d_calibrate", {}, True), ("d_calibrate_two_calls", B.two_calls(name), True)]
    if name == "wanvace":  # bcc's default selection adds the VACE control blocks: a VACE-aware reference
        variants.append(("d_calibrate_default_blocks", {}, False))
    for key, extra, same_blocks in variants:
        if extra is None:
            continue
        with Flow(rec, key) as out:
            kw = {**B.defaults(name), **extra}
            pipe = build(0)
            if same_blocks:  # the reference's blocks (bcc's default selector would add VACE's control blocks)
                kw["blocks"] = rec["default_blocks (reference)"]
            profile = bcc.calibrate(pipe, [None], seeds=[0], num_inference_steps=STEPS, progress=False, **kw)
            out["num_steps"] = profile.num_steps
            out["rows"] = int(profile.l1_rel.shape[0])
            out["block_names"] = list(profile.block_names)
            out["streams"] = list(profile.extra.get("streams", ()))
            out["l1_rel"] = profile.l1_rel.tolist()
            out["denoiser_put_back"] = type(pipe.transformer).__name__
            out["checks"].append({"label": "one row per scheduler step",
                                  "ok": out["rows"] == STEPS == profile.num_steps})
            want = (0,) if not extra else (0, 1)
            out["checks"].append({"label": f"streams {want}", "ok": tuple(out["streams"]) == want})
            out["checks"].append({"label": "denoiser put back", "ok": out["denoiser_put_back"] == rec["denoiser"]})
            out["checks"].append({"label": "calibration left the pipeline's output unchanged",
                                  **compare(gen(pipe), plain_out)})
            try:
                fast_d = bcc.compile(pipe, bcc.Plan(profile, budget=0.6), backend="eager")
                fast_d.transformer.bcc_schedule_for(STEPS)  # a Plan is resolved lazily: BCC503 would come here
                out["budget"] = 0.6
            except BccError as e:  # BCC503: 0.6 unreachable when the cached blocks are a small part of the model
                out["budget_0.6_refused"] = str(e)[:400]
                pipe = build(0)  # fresh: the first compile already wrapped `pipe`
                fast_d = bcc.compile(pipe, bcc.Plan(profile, budget=0.8), backend="eager")
                out["budget"] = 0.8
            try:
                out["bcc_slots"] = str(fast_d.transformer.bcc_slots())[:3000]
            except Exception as e:  # noqa: BLE001
                out["bcc_slots"] = f"{type(e).__name__}: {e}"
            ref_pipe = build(0)
            blocks = [("transformer", n) for n in profile.block_names]
            with Reference(ref_pipe, rows_of_blocks(fast_d, blocks), blocks=blocks,
                           base_override=B.BASE_OVERRIDE.get(name)) as ref:
                for steps in (STEPS, 9):
                    check(out, f"calibrated plan, {steps} steps", gen(fast_d, steps, **extra),
                          gen(ref_pipe, steps, **extra))
            out["calibrated_masks"] = {T: fast_d.transformer.bcc_schedule_for(T).mask.int().tolist()
                                       for T in (STEPS, 9)}

    # e: plain pipeline vs an all-compute Schedule (bcc must not disturb the pipeline's own state) --------
    with Flow(rec, "e_all_compute_vs_plain") as out:
        names = rec["default_blocks (reference)"]
        fast_e = bcc.compile(build(0), bcc.Schedule.all_compute(STEPS, names), backend="eager")
        check(out, "all_compute vs plain, 6 steps", gen(fast_e), plain_out)
        check(out, "all_compute vs plain, 6 steps again (2nd generation)", gen(fast_e), plain_out)
        check(out, "interrupted at 2 vs plain", gen(fast_e, STEPS, callback_on_step_end=P.interrupt_at(2)),
              gen(build(0), STEPS, callback_on_step_end=P.interrupt_at(2)))
        check(out, "then 6 steps vs plain", gen(fast_e), plain_out)
        check(out, "plain pipeline unchanged after all this", gen(plain), plain_out)
        out["scheduler_step_is_class_method"] = "step" not in vars(plain.scheduler)
        out["compiled_pipe_scheduler_instance_attrs_after"] = sorted(
            k for k in vars(fast_e.scheduler) if callable(vars(fast_e.scheduler)[k]))

    warnings.showwarning = showwarning
    rec["bcc_warnings"] = sorted(set(ws))
    return rec


def merge():
    out = {}
    for f in sorted(RUNS.glob("*.json")):
        out[f.stem] = json.loads(f.read_text())
    (HERE / "results.json").write_text(json.dumps(out, indent=1, default=str))


def main(argv):
    names = argv or list(B.BUILDERS)
    RUNS.mkdir(exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            rec = probe(name)
        except Exception as e:  # noqa: BLE001
            rec = {"pipeline": name, "status": "build failed", **error_record(e)}
            print(f"  build FAILED {type(e).__name__}: {e}", flush=True)
        rec["seconds"] = round(time.time() - t0, 1)
        (RUNS / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
    merge()


if __name__ == "__main__":
    main(sys.argv[1:])
