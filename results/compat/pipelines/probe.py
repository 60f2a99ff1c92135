"""Probe bcc (backend="eager") inside real diffusers pipelines of newer models, against the independent
pipeline caching reference of tests/pipelines.py (PipelineCachingReference, per-step, per-stream caches).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python probe.py [chroma qwen sana ltx cogvideox]
Writes runs/<name>.json per pipeline and merges them all into results.json.

Flows per pipeline (all output_type="latent", compared with torch.equal):
  plain_unchanged  an uncompiled pipeline built with the same seed gives the same output before and after
                   another one is compiled and run (bcc must not patch shared/class state)
  a_6_7_6          6, 7, 6 steps on one compiled pipeline vs the reference following its schedules
  b_two_calls      two denoiser calls per step (Chroma guidance_scale>1 + negative prompt, Qwen true_cfg_scale)
  c_interrupt      interrupt at step 2 (callback_on_step_end), then full 6- and 7-step generations
  d_calibrate      bcc.calibrate(pipe, ...) (with two calls too where the pipeline has them): one row per
                   scheduler step, streams; then compile with the calibrated plan vs the reference at 6 and 9
"""
from __future__ import annotations

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


# -- helpers (as in tests/test_pipelines.py) -----------------------------------------------
def plan_for(pipe, steps=(STEPS, 9), budget=0.6):
    names = list(dict.fromkeys(name for _attr, name in P.default_blocks(pipe)))
    profiles = []
    for T in steps:
        l1 = torch.rand(T, len(names), generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        l1[0] = 0
        profiles.append(bcc.ChangeProfile(l1, names))
    return bcc.Plan(tuple(profiles), budget=budget)


def rows_of(fast, ref_pipe):
    blocks = P.default_blocks(ref_pipe)

    def row(step, num_steps):
        out = []
        for attr, name in blocks:
            s = getattr(fast, attr).bcc_schedule_for(num_steps)
            out.append(bool(s.mask[step, s.block_names.index(name)]))
        return out
    return row


def compare(got, want) -> dict:
    if got.shape != want.shape:
        return {"equal": False, "shape": [list(got.shape), list(want.shape)]}
    d = float((got.double() - want.double()).abs().max())
    return {"equal": bool(torch.equal(got, want)), "max_abs": d,
            "rel": d / max(float(want.abs().max()), 1e-30)}


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
            "chain": chain, "frames": frames(exc), "traceback_tail": traceback.format_exc()[-3000:]}


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
            print(f"  [{self.key}] {self.out['status']} ({self.out['seconds']}s)", flush=True)
        return True  # record and go on


def check(out, label, got, want, **extra):
    c = {"label": label, **compare(got, want), **extra}
    out["checks"].append(c)
    return c


def trace_summary(ref):
    return [(g, s, n, k, list(r)) for g, s, n, k, _a, r in ref.trace]


# -- the flows ---------------------------------------------------------------------------
def probe(name: str) -> dict:
    build = B.BUILDERS[name]
    gen = lambda pipe, steps=STEPS, **kw: B.generate(name, pipe, steps=steps, **kw)  # noqa: E731
    rec: dict = {"pipeline": name}
    ws: list = []
    warnings.simplefilter("always")
    showwarning = warnings.showwarning

    def capture_warning(message, category, *a, **k):
        if category.__name__ == "BccWarning":
            ws.append(str(message)[:500])
        return None
    warnings.showwarning = capture_warning

    t_build = time.time()
    plain = build(0)
    rec["class"] = type(plain).__name__
    rec["denoiser"] = type(plain.transformer).__name__
    rec["scheduler"] = type(plain.scheduler).__name__
    rec["default_blocks (reference)"] = [n for _a, n in P.default_blocks(plain)]
    plain_out = gen(plain)
    rec["build_and_plain_s"] = round(time.time() - t_build, 1)
    # a: 6, 7, 6 steps ------------------------------------------------------------------
    fast = None
    with Flow(rec, "a_6_7_6") as out:
        fast = bcc.compile(build(0), plan_for(plain), backend="eager")
        out["compiled_type"] = type(fast.transformer).__name__
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast, ref_pipe)) as ref:
            for steps in (STEPS, 7, STEPS):
                got = gen(fast, steps)
                out.setdefault("schedule_block_names", list(fast.transformer.bcc_schedule_for(steps).block_names))
                check(out, f"{steps} steps", got, gen(ref_pipe, steps))
        tr = trace_summary(ref)
        out["steps_seen_by_reference"] = [(s, n) for _g, s, n, _k, _r in tr]
        out["steps_ok"] = out["steps_seen_by_reference"] == [(s, n) for n in (STEPS, 7, STEPS) for s in range(n)]
        out["blocks_reused"] = any(len(r) != len(ref.blocks) for *_x, r in tr)
        again = gen(fast, STEPS)
        out["moves_output_vs_plain"] = compare(again, plain_out)
        out["stats"] = _stats(fast)
        out["masks"] = {T: fast.transformer.bcc_schedule_for(T).mask.int().tolist() for T in (STEPS, 7)}
        fresh = bcc.compile(build(0), fast.transformer.bcc_plan, backend="eager")
        check(out, "next generation vs freshly compiled", again, gen(fresh, STEPS))
        if not out["steps_ok"]:
            out["checks"].append({"label": "reference step trace", "ok": False})

    # plain pipeline unchanged after compiling and running another ----------------------
    with Flow(rec, "plain_unchanged") as out:
        check(out, "same plain pipeline after compile+run", gen(plain), plain_out)
        check(out, "fresh plain pipeline after compile+run", gen(build(0)), plain_out)
        out["plain_transformer_type"] = type(plain.transformer).__name__
        out["scheduler_step_is_class_method"] = "step" not in vars(plain.scheduler)

    # b: two calls per step -----------------------------------------------------------------
    if name in B.TWO_CALLS:
        kw = B.TWO_CALLS[name]
        with Flow(rec, "b_two_calls") as out:
            out["kwargs"] = {k: v for k, v in kw.items()}
            fast_b = bcc.compile(build(0), plan_for(plain), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_b, ref_pipe)) as ref:
                for steps in (STEPS, 7):
                    check(out, f"{steps} steps", gen(fast_b, steps, **kw), gen(ref_pipe, steps, **kw))
                # and a single-call generation on the same pipeline afterwards
                check(out, f"{STEPS} steps, one call per step, after", gen(fast_b, STEPS), gen(ref_pipe, STEPS))
            tr = trace_summary(ref)
            out["max_stream"] = max(k for _g, _s, _n, k, _r in tr)
            out["stats"] = _stats(fast_b)
            if out["max_stream"] != 1:
                out["checks"].append({"label": "second stream ran", "ok": False})
            fresh = bcc.compile(build(0), plan_for(plain), backend="eager")
            check(out, "next two-call generation vs freshly compiled", gen(fast_b, STEPS, **kw),
                  gen(fresh, STEPS, **kw))
    else:
        calls = []
        h = plain.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        gen(plain, 3)
        h.remove()
        rec["b_two_calls"] = {"status": "n/a", "checks": [],
                              "note": f"CFG is batched into one denoiser call per step ({len(calls)} calls for 3 steps)"}

    # c: interrupt at step 2 ------------------------------------------------------------
    with Flow(rec, "c_interrupt") as out:
        fast_c = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_c, ref_pipe)) as ref:
            check(out, "interrupted at 2", gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2)),
                  gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2)))
            for steps in (STEPS, 7):
                check(out, f"then {steps} steps", gen(fast_c, steps), gen(ref_pipe, steps))
            if name in B.TWO_CALLS:
                kw = B.TWO_CALLS[name]
                check(out, "interrupted at 2, two calls", gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2), **kw),
                      gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2), **kw))
                check(out, "then 6 steps two calls", gen(fast_c, STEPS, **kw), gen(ref_pipe, STEPS, **kw))
        out["first_generation_steps"] = [s for g, s, *_r in trace_summary(ref) if g == 1]

    # d: calibrate ----------------------------------------------------------------------
    with Flow(rec, "d_calibrate") as out:
        kw = B.defaults(name)
        prompts = [kw.pop("prompt")]  # one condition: the batch of two prompts
        pipe = build(0)
        profile = bcc.calibrate(pipe, prompts, seeds=[0], num_inference_steps=STEPS, progress=False, **kw)
        out["num_steps"] = profile.num_steps
        out["rows"] = int(profile.l1_rel.shape[0])
        out["block_names"] = list(profile.block_names)
        out["streams"] = list(profile.extra.get("streams", ()))
        out["l1_rel"] = profile.l1_rel.tolist()
        out["denoiser_put_back"] = type(pipe.transformer).__name__
        out["checks"].append({"label": "one row per scheduler step", "ok": out["rows"] == STEPS == profile.num_steps})
        out["checks"].append({"label": "streams (0,)", "ok": tuple(out["streams"]) == (0,)})
        out["checks"].append({"label": "denoiser put back", "ok": out["denoiser_put_back"] == rec["denoiser"]})
        out["checks"].append({"label": "calibration left the pipeline's output unchanged",
                              **compare(gen(pipe), plain_out)})
        fast_d = bcc.compile(pipe, bcc.Plan(profile, budget=0.6), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_d, ref_pipe)) as ref:
            for steps in (STEPS, 9):
                check(out, f"calibrated plan, {steps} steps", gen(fast_d, steps), gen(ref_pipe, steps))
        out["calibrated_masks"] = {T: fast_d.transformer.bcc_schedule_for(T).mask.int().tolist() for T in (STEPS, 9)}
    if name in B.TWO_CALLS:
        with Flow(rec, "d_calibrate_two_calls") as out:
            kw = {**B.defaults(name), **B.TWO_CALLS[name]}
            prompts = [kw.pop("prompt")]
            pipe = build(0)
            profile = bcc.calibrate(pipe, prompts, seeds=[0], num_inference_steps=STEPS, progress=False, **kw)
            out["num_steps"] = profile.num_steps
            out["rows"] = int(profile.l1_rel.shape[0])
            out["streams"] = list(profile.extra.get("streams", ()))
            per = profile.extra.get("per_stream_l1_rel")
            out["checks"].append({"label": "one row per scheduler step", "ok": out["rows"] == STEPS == profile.num_steps})
            out["checks"].append({"label": "streams (0, 1)", "ok": tuple(out["streams"]) == (0, 1)})
            if per is not None:
                per = torch.tensor(per, dtype=torch.float64)
                out["checks"].append({"label": "mean of per-stream curves",
                                      "ok": bool(torch.allclose(per.mean(0), profile.l1_rel.double()))})
            fast_d = bcc.compile(pipe, bcc.Plan(profile, budget=0.6), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_d, ref_pipe)):
                for steps in (STEPS, 9):
                    check(out, f"calibrated plan, {steps} steps, two calls",
                          gen(fast_d, steps, **B.TWO_CALLS[name]), gen(ref_pipe, steps, **B.TWO_CALLS[name]))

    # e: a new input signature between generations (resolution; Qwen: unpadded prompt lengths) ---------
    with Flow(rec, "e_new_signature") as out:
        base_h = B.defaults(name)["height"]
        sizes = [base_h, 2 * base_h if name in ("chroma", "qwen", "sana") else base_h + base_h // 2, base_h]
        out["heights"] = sizes
        fast_e = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_e, ref_pipe)):
            for h in sizes:
                check(out, f"{h}x{h}", gen(fast_e, STEPS, height=h, width=h), gen(ref_pipe, STEPS, height=h, width=h))
            if name == "qwen":  # unpadded text: each prompt batch has its own length; cond and uncond differ
                kw = dict(max_sequence_length=512, true_cfg_scale=4.0,
                          negative_prompt=["blurry and noisy, low quality", "bad"])
                for prompts in (list(B.PROMPTS), ["a green 5 on a white wall", "x"]):
                    check(out, f"unpadded text, true CFG, prompts {prompts}", gen(fast_e, STEPS, prompt=prompts, **kw),
                          gen(ref_pipe, STEPS, prompt=prompts, **kw))
            check(out, "num_images_per_prompt=2 (batch 4; CogVideoX forces 1)", gen(fast_e, STEPS, num_images_per_prompt=2) if name not in ("ltx", "cogvideox")
                  else gen(fast_e, STEPS, num_videos_per_prompt=2),
                  gen(ref_pipe, STEPS, num_images_per_prompt=2) if name not in ("ltx", "cogvideox") else gen(ref_pipe, STEPS, num_videos_per_prompt=2))
        out["stats"] = _stats(fast_e)

    # f: an exception in callback_on_step_end, then a full generation ---------------------------
    with Flow(rec, "f_callback_raises") as out:
        fast_f = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_f, ref_pipe)):
            for pipe in (fast_f, ref_pipe):
                try:
                    gen(pipe, STEPS, callback_on_step_end=P.raise_at(2))
                    out["checks"].append({"label": "callback exception propagated", "ok": False})
                except RuntimeError as e:
                    if "callback failed" not in str(e):
                        raise
            check(out, "then 6 steps", gen(fast_f, STEPS), gen(ref_pipe, STEPS))

    # g: img2img sharing the compiled transformer (from_pipe), Chroma and Qwen ------------------
    if name in ("chroma", "qwen"):
        cls = {"chroma": "ChromaImg2ImgPipeline", "qwen": "QwenImageImg2ImgPipeline"}[name]
        with Flow(rec, "g_img2img_from_pipe") as out:
            import diffusers
            fast_g = bcc.compile(build(0), plan_for(plain), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_g, ref_pipe)) as ref:
                i2i = getattr(diffusers, cls).from_pipe(fast_g)
                ri2i = getattr(diffusers, cls).from_pipe(ref_pipe)
                for p_ in (i2i, ri2i):
                    p_.set_progress_bar_config(disable=True)
                out["shares_denoiser"] = i2i.transformer is fast_g.transformer
                kw = dict(image=P.init_image(16), strength=0.6)
                check(out, "txt2img 6", gen(fast_g, STEPS), gen(ref_pipe, STEPS))
                check(out, "img2img 6 @0.6", gen(i2i, STEPS, **kw), gen(ri2i, STEPS, **kw))
                check(out, "txt2img 7", gen(fast_g, 7), gen(ref_pipe, 7))
                check(out, "img2img 7 @0.6 true/neg CFG", gen(i2i, 7, **kw, **B.TWO_CALLS[name]),
                      gen(ri2i, 7, **kw, **B.TWO_CALLS[name]))
            out["img2img_first_steps"] = sorted({s for g, s, n, k, _r in trace_summary(ref) if g == 2})

    # h: CogVideoX with its other scheduler (CogVideoXDPMScheduler: step returns old_pred_original_sample) --
    if name == "cogvideox":
        with Flow(rec, "h_dpm_scheduler") as out:
            from diffusers import CogVideoXDPMScheduler

            def with_dpm(seed):
                p_ = build(seed)
                p_.scheduler = CogVideoXDPMScheduler.from_config(p_.scheduler.config)
                return p_
            fast_h = bcc.compile(with_dpm(0), plan_for(plain), backend="eager")
            ref_pipe = with_dpm(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_h, ref_pipe)) as ref:
                for steps in (STEPS, 7):
                    check(out, f"{steps} steps", gen(fast_h, steps), gen(ref_pipe, steps))
                check(out, "use_dynamic_cfg=True", gen(fast_h, STEPS, use_dynamic_cfg=True),
                      gen(ref_pipe, STEPS, use_dynamic_cfg=True))
            out["steps_ok"] = [(s, n) for _g, s, n, _k, _r in trace_summary(ref)][:STEPS] == [(s, STEPS) for s in range(STEPS)]

    # i: an all-compute fixed Schedule equals the plain pipeline bit for bit ---------------------
    with Flow(rec, "i_all_compute_equals_plain") as out:
        names = [n for _a, n in P.default_blocks(plain)]
        fast_i = bcc.compile(build(0), bcc.Schedule.every(1, STEPS, names), backend="eager")
        check(out, "Schedule.every(1) vs plain, 6 steps", gen(fast_i), plain_out)
        if name in B.TWO_CALLS:
            check(out, "Schedule.every(1) vs plain, two calls", gen(fast_i, STEPS, **B.TWO_CALLS[name]),
                  gen(build(0), STEPS, **B.TWO_CALLS[name]))

    warnings.showwarning = showwarning
    rec["bcc_warnings"] = sorted(set(ws))
    return rec


def _stats(fast):
    try:
        s = fast.transformer.bcc_stats()
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in s.items()}
    except Exception as e:
        return {"error": str(e)}


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
        except Exception as e:
            rec = {"pipeline": name, "status": "build failed", **error_record(e)}
            print(f"  build FAILED {e}", flush=True)
        rec["seconds"] = round(time.time() - t0, 1)
        (RUNS / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
    merge()


if __name__ == "__main__":
    main(sys.argv[1:])
