"""Probe bcc (backend="eager") inside image/video-conditioned diffusers pipelines (FluxKontext, QwenImageEdit,
Wan 2.2 TI2V t2v/i2v with expand_timesteps, Wan 2.1 I2V, FluxFill) against the independent pipeline caching
reference of tests/pipelines.py (PipelineCachingReference), as tests/test_pipelines.py:reference_of does.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python probe.py [names...]   (see builders.BUILDERS)
Writes runs/<name>.json per pipeline and merges them into results.json.

Flows (output_type="latent", torch.equal):
  a_6_7_6           6, 7, 6 steps on one compiled pipeline vs the reference following its schedules
  plain_unchanged   a plain pipeline's output is unchanged after another copy was compiled and run
  b_two_calls       two denoiser calls per step (true CFG / Wan CFG), then a one-call generation
  c_interrupt       interrupt at step 2, then full 6- and 7-step generations (also with two calls)
  d_calibrate       bcc.calibrate rows/streams (one and two calls), calibrated plan vs reference at 6 and 9
  e_new_signature   another conditioning image size / resolution / batch between generations
  i_all_compute     Schedule.every(1) == plain pipeline bit for bit
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


def _stats(fast):
    try:
        s = fast.transformer.bcc_stats()
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in s.items()}
    except Exception as e:
        return {"error": str(e)}


PROMPTS4 = list(B.PROMPTS) + ["a green 5", "a white 1"]


def e_variants(name):
    """(label, overrides) generations with a new input signature between them."""
    if name == "flux_kontext":
        return [("cond image 16x16", {}), ("cond image 24x24", dict(image=B.cond_image(24))),
                ("cond image 16x32 (non-square)", dict(image=B.cond_image(16, w=32))), ("cond image 16x16 again", {}),
                ("num_images_per_prompt=2", dict(num_images_per_prompt=2))]
    if name == "flux_fill":
        return [("16x16", {}), ("24x24", dict(height=24, width=24, image=B.cond_image(24), mask_image=B.fill_mask(24))),
                ("16x16 again", {}), ("num_images_per_prompt=2", dict(num_images_per_prompt=2))]
    if name == "qwen_edit":
        e2, m2 = B.qwen_embeds([4, 9], seed=3)
        return [("cond 32x32", {}), ("cond 64x32 (image 16x32, area 2048)", dict(image=B.cond_image(16, pil=True, w=32), _area=2048)),
                ("cond 32x32 again", {}), ("other prompt lengths", dict(prompt_embeds=e2, prompt_embeds_mask=m2)),
                ("num_images_per_prompt=2", dict(num_images_per_prompt=2))]
    if name == "qwen_edit_plus":
        imgs = [B.cond_image(16, seed=k, pil=True) for k in range(3)]
        return [("2 cond images", {}), ("1 cond image", dict(image=imgs[:1])), ("3 cond images", dict(image=imgs)),
                ("2 cond images again", {}), ("num_images_per_prompt=2", dict(num_images_per_prompt=2))]
    if name.startswith("wan"):
        i2v = "_i2v" in name
        big = dict(height=32, width=32, **({"image": B.cond_image(32, pil=True)} if i2v else {}))
        batch = (("batch of 4 prompts", dict(prompt=PROMPTS4)) if i2v
                 else ("num_videos_per_prompt=2", dict(num_videos_per_prompt=2)))
        return [("16x16", {}), ("32x32 (Wan needs multiples of 16)", big), ("16x16 again", {}), batch]
    return []


# -- the flows ---------------------------------------------------------------------------
def probe(name: str) -> dict:
    build = B.BUILDERS[name]

    def gen(pipe, steps=STEPS, **kw):
        area = kw.pop("_area", None)
        if area is not None:
            with B.qwen_edit_area(area):
                return B.generate(name, pipe, steps=steps, **kw)
        return B.generate(name, pipe, steps=steps, **kw)

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
    two = B.two_calls(name)

    # a: 6, 7, 6 steps ------------------------------------------------------------------
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

    with Flow(rec, "plain_unchanged") as out:
        check(out, "same plain pipeline after compile+run", gen(plain), plain_out)
        check(out, "fresh plain pipeline after compile+run", gen(build(0)), plain_out)
        out["plain_transformer_type"] = type(plain.transformer).__name__
        out["scheduler_step_is_class_method"] = "step" not in vars(plain.scheduler)

    # b: two calls per step -----------------------------------------------------------------
    if two:
        with Flow(rec, "b_two_calls") as out:
            out["kwargs"] = {k: (v if not isinstance(v, torch.Tensor) else f"tensor{tuple(v.shape)}") for k, v in two.items()}
            fast_b = bcc.compile(build(0), plan_for(plain), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_b, ref_pipe)) as ref:
                for steps in (STEPS, 7):
                    check(out, f"{steps} steps", gen(fast_b, steps, **two), gen(ref_pipe, steps, **two))
                check(out, f"{STEPS} steps, one call per step, after", gen(fast_b, STEPS), gen(ref_pipe, STEPS))
            tr = trace_summary(ref)
            out["max_stream"] = max(k for _g, _s, _n, k, _r in tr)
            out["stats"] = _stats(fast_b)
            if out["max_stream"] != 1:
                out["checks"].append({"label": "second stream ran", "ok": False})
            fresh = bcc.compile(build(0), plan_for(plain), backend="eager")
            check(out, "next two-call generation vs freshly compiled", gen(fast_b, STEPS, **two), gen(fresh, STEPS, **two))
    else:
        rec["b_two_calls"] = {"status": "n/a", "checks": [], "note": "FluxFill has no true-CFG/negative prompt path"}

    # c: interrupt at step 2 ------------------------------------------------------------
    with Flow(rec, "c_interrupt") as out:
        fast_c = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_c, ref_pipe)) as ref:
            check(out, "interrupted at 2", gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2)),
                  gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2)))
            for steps in (STEPS, 7):
                check(out, f"then {steps} steps", gen(fast_c, steps), gen(ref_pipe, steps))
            if two:
                check(out, "interrupted at 2, two calls", gen(fast_c, STEPS, callback_on_step_end=P.interrupt_at(2), **two),
                      gen(ref_pipe, STEPS, callback_on_step_end=P.interrupt_at(2), **two))
                check(out, "then 6 steps two calls", gen(fast_c, STEPS, **two), gen(ref_pipe, STEPS, **two))
        out["first_generation_steps"] = [s for g, s, *_r in trace_summary(ref) if g == 1]

    # d: calibrate ----------------------------------------------------------------------
    for key, extra, want_streams in (("d_calibrate", {}, (0,)), ("d_calibrate_two_calls", two, (0, 1))):
        if key == "d_calibrate_two_calls" and not two:
            continue
        with Flow(rec, key) as out:
            pipe = build(0)
            kw = B.pipe_kwargs(name, pipe, **extra)
            prompts = [kw.pop("prompt")]  # one condition: the batch of two prompts (None: prompt_embeds in kw)
            if getattr(pipe, "transformer_2", None) is not None:
                try:
                    bcc.calibrate(pipe, prompts, seeds=[0], num_inference_steps=STEPS, progress=False, **kw)
                    out["checks"].append({"label": "calibrate without denoiser= refused", "ok": False})
                except BccError as e:
                    out["without_denoiser"] = f"BccError {getattr(e.code, 'value', None)}: {str(e)[:200]}"
                profs = {a: bcc.calibrate(pipe, prompts, seeds=[0], num_inference_steps=STEPS, progress=False,
                                          denoiser=a, **kw) for a in ("transformer", "transformer_2")}
                out["active_steps"] = {a: list(p_.active_steps) for a, p_ in profs.items()}
                out["streams"] = {a: list(p_.extra.get("streams", ())) for a, p_ in profs.items()}
                out["rows"] = {a: int(p_.l1_rel.shape[0]) for a, p_ in profs.items()}
                out["checks"].append({"label": "experts split the steps", "ok": profs["transformer"].active_steps[0] == 0
                                      and profs["transformer"].active_steps[1] == profs["transformer_2"].active_steps[0]
                                      and profs["transformer_2"].active_steps[1] == STEPS})
                out["checks"].append({"label": f"streams {want_streams}",
                                      "ok": all(tuple(v) == want_streams for v in out["streams"].values())})
                out["checks"].append({"label": "denoisers put back", "ok": type(pipe.transformer_2).__name__ == rec["denoiser"]})
                fast_d = bcc.compile(pipe, {a: bcc.Plan(p_, budget=0.6) for a, p_ in profs.items()}, backend="eager")
                ref_pipe = build(0)
                with P.PipelineCachingReference(ref_pipe, rows_of(fast_d, ref_pipe)):
                    for steps in (STEPS, 9):
                        check(out, f"calibrated plans, {steps} steps", gen(fast_d, steps, **extra),
                              gen(ref_pipe, steps, **extra))
                continue
            profile = bcc.calibrate(pipe, prompts, seeds=[0], num_inference_steps=STEPS, progress=False, **kw)
            out["num_steps"] = profile.num_steps
            out["rows"] = int(profile.l1_rel.shape[0])
            out["block_names"] = list(profile.block_names)
            out["streams"] = list(profile.extra.get("streams", ()))
            out["l1_rel"] = profile.l1_rel.tolist()
            out["denoiser_put_back"] = type(pipe.transformer).__name__
            out["checks"].append({"label": "one row per scheduler step", "ok": out["rows"] == STEPS == profile.num_steps})
            out["checks"].append({"label": f"streams {want_streams}", "ok": tuple(out["streams"]) == want_streams})
            out["checks"].append({"label": "denoiser put back", "ok": out["denoiser_put_back"] == rec["denoiser"]})
            per = profile.extra.get("per_stream_l1_rel")
            if extra and per is not None:
                per = torch.tensor(per, dtype=torch.float64)
                out["checks"].append({"label": "mean of per-stream curves",
                                      "ok": bool(torch.allclose(per.mean(0), profile.l1_rel.double()))})
            if not extra:
                out["checks"].append({"label": "calibration left the pipeline's output unchanged",
                                      **compare(gen(pipe), plain_out)})
            fast_d = bcc.compile(pipe, bcc.Plan(profile, budget=0.6), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_d, ref_pipe)):
                for steps in (STEPS, 9):
                    check(out, f"calibrated plan, {steps} steps", gen(fast_d, steps, **extra), gen(ref_pipe, steps, **extra))
            out["calibrated_masks"] = {T: fast_d.transformer.bcc_schedule_for(T).mask.int().tolist() for T in (STEPS, 9)}

    # e: new input signature between generations ------------------------------------------
    with Flow(rec, "e_new_signature") as out:
        fast_e = bcc.compile(build(0), plan_for(plain), backend="eager")
        ref_pipe = build(0)
        with P.PipelineCachingReference(ref_pipe, rows_of(fast_e, ref_pipe)):
            for label, kw in e_variants(name):
                check(out, label, gen(fast_e, STEPS, **kw), gen(ref_pipe, STEPS, **kw))
            if two:
                label, kw = e_variants(name)[1]
                check(out, label + ", two calls", gen(fast_e, STEPS, **kw, **two), gen(ref_pipe, STEPS, **kw, **two))
        out["stats"] = _stats(fast_e)

    # e2: Wan I2V with prompt_embeds and num_videos_per_prompt=2 fails in the plain pipeline (embeds are not
    # repeated when passed in); what does the compiled one raise, and does it recover? ---------------------
    if "_i2v" in name:
        with Flow(rec, "e2_invalid_input_then_full") as out:
            fast_x = bcc.compile(build(0), plan_for(plain), backend="eager")
            ref_pipe = build(0)
            with P.PipelineCachingReference(ref_pipe, rows_of(fast_x, ref_pipe)):
                check(out, "6 steps before", gen(fast_x, STEPS), gen(ref_pipe, STEPS))
                for who, p_ in (("compiled", fast_x), ("reference", ref_pipe), ("plain", build(0))):
                    try:
                        gen(p_, STEPS, num_videos_per_prompt=2)
                        out[f"{who}_raised"] = None
                    except Exception as e:  # noqa: BLE001
                        out[f"{who}_raised"] = f"{type(e).__name__}: {str(e)[:160]}"
                        if who == "compiled":
                            out["compiled_cause"] = f"{type(e.__cause__).__name__}: {str(e.__cause__)[:160]}"
                            out["compiled_is_bcc_error"] = isinstance(e, BccError)
                check(out, "6 steps after the failed call", gen(fast_x, STEPS), gen(ref_pipe, STEPS))
                check(out, "7 steps after", gen(fast_x, 7), gen(ref_pipe, 7))
            out["stats"] = _stats(fast_x)

    # i: an all-compute fixed Schedule equals the plain pipeline bit for bit -------------------
    with Flow(rec, "i_all_compute_equals_plain") as out:
        names = list(dict.fromkeys(n for _a, n in P.default_blocks(plain)))
        fast_i = bcc.compile(build(0), bcc.Schedule.every(1, STEPS, names), backend="eager")
        check(out, "Schedule.every(1) vs plain, 6 steps", gen(fast_i), plain_out)
        if two:
            check(out, "Schedule.every(1) vs plain, two calls", gen(fast_i, STEPS, **two), gen(build(0), STEPS, **two))

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
        except Exception as e:
            rec = {"pipeline": name, "status": "build failed", **error_record(e)}
            print(f"  build FAILED {e}", flush=True)
        rec["seconds"] = round(time.time() - t0, 1)
        (RUNS / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
    merge()


if __name__ == "__main__":
    main(sys.argv[1:])
