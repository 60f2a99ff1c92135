"""bcc.compile(pipe, plan) on real diffusers pipelines (tests/pipelines.py: SD 1.x, SDXL, PixArt-Σ,
SD3, Flux, Wan): the step of every denoiser call comes from the scheduler, so every flow that
breaks call counting gives exactly what the independent pipeline caching reference gives
(per-step, per-stream caches), and the next generation is what a freshly compiled pipeline gives."""
import contextlib

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import bcc
from bcc import BccError, ErrorCode, Schedule

import pipelines as P

STEPS = 6


_one_thread = pytest.fixture(autouse=True)(P.one_thread)


# -- helpers ----------------------------------------------------------------------------
def plan_for(pipe, steps=(STEPS, 9), budget=0.6):
    """A plan over the pipeline's default blocks from made-up profiles at `steps` (6 is served
    exactly, 7 by resampling the 6-step profile): it reuses blocks at several steps."""
    names = list(dict.fromkeys(name for _attr, name in P.default_blocks(pipe)))
    profiles = []
    for T in steps:
        l1 = torch.rand(T, len(names), generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        l1[0] = 0
        profiles.append(bcc.ChangeProfile(l1, names))
    return bcc.Plan(tuple(profiles), budget=budget)


def compiled(name, plan=None, backend="eager", **kwargs):
    pipe = P.BUILDERS[name](0, **kwargs)
    return bcc.compile(pipe, plan or plan_for(pipe), backend=backend)


def rows_of(fast, ref_pipe):
    """The reference's schedule: each block's column of the compiled denoiser's schedule for T."""
    blocks = P.default_blocks(ref_pipe)

    def row(step, num_steps):
        out = []
        for attr, name in blocks:
            s = getattr(fast, attr).bcc_schedule_for(num_steps)
            out.append(bool(s.mask[step, s.block_names.index(name)]))
        return out
    return row


@contextlib.contextmanager
def reference_of(fast, name, **kwargs):
    """An identically built pipeline under the independent reference, following `fast`'s schedules."""
    ref_pipe = P.BUILDERS[name](0, **kwargs)
    with P.PipelineCachingReference(ref_pipe, rows_of(fast, ref_pipe)) as ref:
        yield ref_pipe, ref


def close(got, want, exact):
    if exact:
        assert torch.equal(got, want), float((got - want).abs().max())
    else:
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel <= 1e-5, rel


def then_fresh(fast, name, plan, **kwargs):
    """The next generation equals the same generation on a freshly compiled pipeline."""
    fresh = compiled(name, plan, **kwargs)
    assert torch.equal(P.generate(fast, steps=STEPS), P.generate(fresh, steps=STEPS))


# -- (a) any step count on one compiled pipeline -----------------------------------------------
@pytest.mark.parametrize("name", sorted(P.BUILDERS))
def test_generations_of_6_7_6_steps_equal_the_reference(name):
    fast = compiled(name)
    plan = getattr(fast, P.denoiser_attrs(fast)[0]).bcc_plan
    plain = P.generate(P.BUILDERS[name](0), steps=STEPS)
    with reference_of(fast, name) as (ref_pipe, ref):
        for steps in (STEPS, 7, STEPS):
            close(P.generate(fast, steps=steps), P.generate(ref_pipe, steps=steps), exact=True)
    assert [(s, n) for _g, s, n, _k, _a, _r in ref.trace] == \
        [(s, n) for n in (STEPS, 7, STEPS) for s in range(n)]
    assert any(r != list(range(len(ref.blocks))) for *_x, r in ref.trace)  # blocks really reused
    assert not torch.equal(P.generate(fast, steps=STEPS), plain)
    schedule7 = getattr(fast, P.denoiser_attrs(fast)[0]).bcc_schedule_for(7)
    assert schedule7.meta["plan_resampled_from"] == STEPS  # no 7-step profile: the 6-step one resampled
    then_fresh(fast, name, plan)


# -- (b) img2img sharing the compiled denoiser with txt2img (from_pipe), both orders ----------
@pytest.mark.parametrize("base", ["sd", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("order", ["txt2img_first", "img2img_first"])
def test_img2img_from_pipe_shares_the_compiled_denoiser(base, order):
    fast = compiled(base)
    fast_i2i = getattr(P, f"{base}_img2img")(fast)
    attr = P.denoiser_attrs(fast)[0]
    assert getattr(fast_i2i, attr) is getattr(fast, attr)
    flows = [(fast, {}), (fast_i2i, {"strength": 0.6})]
    with reference_of(fast, base) as (ref_pipe, ref):
        ref_i2i = getattr(P, f"{base}_img2img")(ref_pipe)
        refs = [ref_pipe, ref_i2i]
        order_ = (0, 1, 0) if order == "txt2img_first" else (1, 0, 1)
        for k in order_:
            (pipe, kw), want_pipe = flows[k], refs[k]
            close(P.generate(pipe, steps=STEPS, **kw), P.generate(want_pipe, steps=STEPS, **kw), exact=True)
    begins = [s for g, s, *_r in ref.trace if g == (2 if order == "txt2img_first" else 1)]
    assert begins[0] > 0  # the img2img generation started mid-trajectory (3 for SD/SDXL, 2 for SD3/Flux)
    then_fresh(fast, base, getattr(fast, attr).bcc_plan)


# -- (c), (d): an interrupt, an exception in a callback, then full generations ----------------
@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "wan"])
def test_interrupt_at_step_2_then_a_full_generation(name):
    fast = compiled(name)
    with reference_of(fast, name) as (ref_pipe, ref):
        close(P.generate(fast, steps=STEPS, callback_on_step_end=P.interrupt_at(2)),
              P.generate(ref_pipe, steps=STEPS, callback_on_step_end=P.interrupt_at(2)), exact=True)
        for steps in (STEPS, 7):
            close(P.generate(fast, steps=steps), P.generate(ref_pipe, steps=steps), exact=True)
    assert [s for g, s, *_r in ref.trace if g == 1] == [0, 1, 2]
    then_fresh(fast, name, getattr(fast, P.denoiser_attrs(fast)[0]).bcc_plan)


@pytest.mark.parametrize("name", ["sd", "sd3", "flux", "wan"])
def test_exception_in_callback_on_step_end_then_a_full_generation(name):
    fast = compiled(name)
    with reference_of(fast, name) as (ref_pipe, _ref):
        for pipe in (fast, ref_pipe):
            with pytest.raises(RuntimeError, match="callback failed"):
                P.generate(pipe, steps=STEPS, callback_on_step_end=P.raise_at(2))
        close(P.generate(fast, steps=STEPS), P.generate(ref_pipe, steps=STEPS), exact=True)
    then_fresh(fast, name, getattr(fast, P.denoiser_attrs(fast)[0]).bcc_plan)


# -- (e) two denoiser calls per step ---------------------------------------------------------
TWO_CALLS = {
    "flux_true_cfg": ("flux", {}, dict(true_cfg_scale=2.0, negative_prompt=P.NEGATIVE)),
    "wan_guidance": ("wan", {}, dict(guidance_scale=3.0, negative_prompt=P.NEGATIVE)),
    "wan22_two_experts": ("wan", {"two_experts": True},
                          dict(guidance_scale=3.0, guidance_scale_2=2.0, negative_prompt=P.NEGATIVE)),
    "sd3_skip_layer_guidance": ("sd3", {}, dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                                skip_layer_guidance_stop=0.5)),
}


@pytest.mark.parametrize("flow", sorted(TWO_CALLS))
def test_two_calls_per_step_each_stream_has_its_own_caches(flow):
    name, build_kw, kw = TWO_CALLS[flow]
    fast = compiled(name, **build_kw)
    plan = getattr(fast, P.denoiser_attrs(fast)[0]).bcc_plan
    with reference_of(fast, name, **build_kw) as (ref_pipe, ref):
        for steps in (STEPS, 7):
            close(P.generate(fast, steps=steps, **kw), P.generate(ref_pipe, steps=steps, **kw), exact=True)
    assert max(k for *_x, k, _a, _r in ref.trace) == 1  # a second stream ran
    for attr in P.denoiser_attrs(fast):
        assert getattr(fast, attr).bcc_stats()["streams"] == 2
    if flow == "sd3_skip_layer_guidance":  # the skip_layers call is another signature: its own graph
        assert fast.transformer.bcc_stats()["signatures"] == 2
    fresh = compiled(name, plan, **build_kw)
    assert torch.equal(P.generate(fast, steps=STEPS, **kw), P.generate(fresh, steps=STEPS, **kw))
    then_fresh(fast, name, plan, **build_kw)


# -- (f) FreeU enabled after compiling -------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_freeu_enabled_after_compiling_is_followed(name):
    fast = compiled(name)
    with reference_of(fast, name) as (ref_pipe, _ref):
        close(P.generate(fast, steps=STEPS), P.generate(ref_pipe, steps=STEPS), exact=True)  # captured without
        before = P.generate(fast, steps=STEPS)
        for pipe in (fast, ref_pipe):
            pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        with_freeu = P.generate(fast, steps=STEPS)
        close(with_freeu, P.generate(ref_pipe, steps=STEPS), exact=True)
        assert not torch.equal(with_freeu, before)
        for pipe in (fast, ref_pipe):
            pipe.disable_freeu()
        close(P.generate(fast, steps=STEPS), before, exact=True)
    fast.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    fresh = P.BUILDERS[name](0)
    fresh.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    fresh = bcc.compile(fresh, fast.unet.bcc_plan, backend="eager")
    assert torch.equal(P.generate(fast, steps=STEPS), P.generate(fresh, steps=STEPS))


# -- inductor: a representative subset, within 1e-5, and one graph per input signature -------
@pytest.mark.parametrize("flow", ["sd_steps_and_img2img", pytest.param("flux_true_cfg", marks=pytest.mark.slow),
                                  pytest.param("sd3_skip_layer_guidance", marks=pytest.mark.slow)])
def test_inductor_matches_the_reference_with_one_graph_per_signature(flow):
    counter = CompileCounterWithBackend("inductor")
    name = {"sd_steps_and_img2img": "sd", "flux_true_cfg": "flux", "sd3_skip_layer_guidance": "sd3"}[flow]
    kw = {"flux_true_cfg": TWO_CALLS["flux_true_cfg"][2],
          "sd3_skip_layer_guidance": TWO_CALLS["sd3_skip_layer_guidance"][2]}.get(flow, {})
    fast = compiled(name, backend=counter)
    with reference_of(fast, name) as (ref_pipe, _ref):
        runs = [(fast, ref_pipe, STEPS, kw), (fast, ref_pipe, 7, kw), (fast, ref_pipe, STEPS, kw)]
        if flow == "sd_steps_and_img2img":
            runs.append((P.sd_img2img(fast), P.sd_img2img(ref_pipe), STEPS, {"strength": 0.6}))
        for pipe, want_pipe, steps, extra in runs:
            close(P.generate(pipe, steps=steps, **extra), P.generate(want_pipe, steps=steps, **extra), exact=False)
    stats = getattr(fast, P.denoiser_attrs(fast)[0]).bcc_stats()
    # one compiled graph per input signature: no recompile for 7 steps, img2img or a second stream
    assert counter.frame_count == stats["signatures"] == (2 if flow == "sd3_skip_layer_guidance" else 1)
    assert stats["step_counts"] == 2


# -- a fixed Schedule is one step count ------------------------------------------------------------
def test_a_fixed_6_row_schedule_for_a_7_step_generation_fails_at_its_first_call():
    pipe = P.sd(0)
    names = [n for _a, n in P.default_blocks(pipe)]
    bcc.compile(pipe, Schedule.every(2, STEPS, names), backend="eager")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    P.generate(pipe, steps=STEPS)
    with pytest.raises(BccError) as e:
        P.generate(pipe, steps=7)
    assert e.value.code is ErrorCode.SCHEDULE_SHAPE and "6-step Schedule" in str(e.value) and "7-step" in str(e.value)
    assert len(calls) == STEPS + 1  # refused at the 7-step generation's first call
    assert torch.equal(P.generate(pipe, steps=STEPS), P.generate(
        bcc.compile(P.sd(0), Schedule.every(2, STEPS, names), backend="eager"), steps=STEPS))


# -- the step-identity path reads no tensor value ------------------------------------------------
@contextlib.contextmanager
def unreadable_timesteps(pipe, monkeypatch):
    """Inside every denoiser call, reading a value of the timestep argument or of
    scheduler.timesteps (item, tolist, bool, float, int, index, numpy) raises."""
    watched: list = []
    inside = [False]

    def shares(t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except Exception:  # fake tensors (capture) have no storage
            return False
        return any(ptr == w for w in watched)

    def guard(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0] and type(self) is torch.Tensor and shares(self):
                raise AssertionError(f"Tensor.{name} read the timestep during a denoiser call")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        guard(name)

    def enter(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        watched[:] = [pipe.scheduler.timesteps.untyped_storage().data_ptr()]
        if isinstance(t, torch.Tensor):
            watched.append(t.untyped_storage().data_ptr())
        inside[0] = True

    def leave(module, args, kwargs, out):
        inside[0] = False

    attr = P.denoiser_attrs(pipe)[0]
    handles = [getattr(pipe, attr).register_forward_pre_hook(enter, with_kwargs=True),
               getattr(pipe, attr).register_forward_hook(leave, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name,kw", [("sd", {}), ("flux", TWO_CALLS["flux_true_cfg"][2])])
def test_the_step_identity_path_reads_no_tensor_value(name, kw, monkeypatch):
    fast = compiled(name)
    with reference_of(fast, name) as (ref_pipe, _ref):
        want = [P.generate(ref_pipe, steps=s, **kw) for s in (STEPS, 7)]
        want_i2i = P.generate(P.sd_img2img(ref_pipe), steps=STEPS, strength=0.6) if name == "sd" else None
    with unreadable_timesteps(fast, monkeypatch):
        got = [P.generate(fast, steps=s, **kw) for s in (STEPS, 7)]  # the first call captures, too
        if name == "sd":  # DDIM has no set_begin_index: the begin comes from the timestep's storage offset
            i2i = P.sd_img2img(fast)
            with unreadable_timesteps(i2i, monkeypatch):
                got_i2i = P.generate(i2i, steps=STEPS, strength=0.6)
            close(got_i2i, want_i2i, exact=True)
    for g, w in zip(got, want):
        close(g, w, exact=True)


def test_the_guard_of_the_no_read_test_does_catch_a_read(monkeypatch):
    pipe = P.sd(0)
    with unreadable_timesteps(pipe, monkeypatch), pytest.raises(AssertionError, match="read the timestep"):
        pipe.unet.register_forward_pre_hook(lambda m, a, k: None if float(a[1]) else None, with_kwargs=True)
        P.generate(pipe, steps=2)


# -- schedulers bcc does not see ----------------------------------------------------------------
def test_a_replaced_scheduler_is_adopted():
    from diffusers import EulerDiscreteScheduler

    fast = compiled("sd")
    with reference_of(fast, "sd") as (ref_pipe, _ref):
        P.generate(fast, steps=STEPS)
        P.generate(ref_pipe, steps=STEPS)
    fast.scheduler = EulerDiscreteScheduler.from_config(fast.scheduler.config)
    ref_pipe = P.sd(0)
    ref_pipe.scheduler = EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    with P.PipelineCachingReference(ref_pipe, rows_of(fast, ref_pipe)):
        for steps in (STEPS, 7):
            close(P.generate(fast, steps=steps), P.generate(ref_pipe, steps=steps), exact=True)


def test_a_denoiser_driven_by_a_scheduler_bcc_did_not_wrap_is_refused():
    from diffusers import EulerDiscreteScheduler

    fast = compiled("sd")
    other = P._from_pipe("StableDiffusionImg2ImgPipeline", fast)
    other.scheduler = EulerDiscreteScheduler.from_config(fast.scheduler.config)  # = from_pipe(..., scheduler=)
    with pytest.raises(BccError) as e:
        P.generate(other, steps=STEPS)  # no generation of the wrapped scheduler
    assert e.value.code is ErrorCode.STEP_UNTRACKED and "bcc.compile(other_pipe" in str(e.value)
    P.generate(fast, steps=STEPS, callback_on_step_end=P.interrupt_at(1))
    with pytest.raises(BccError) as e:
        P.generate(other, steps=STEPS)  # the interrupted generation ended (maybe_free_model_hooks)
    assert e.value.code is ErrorCode.STEP_UNTRACKED
    with pytest.raises(RuntimeError, match="callback failed"):
        P.generate(fast, steps=STEPS, callback_on_step_end=P.raise_at(1))  # no end signal after an exception ...
    with pytest.raises(BccError) as e:
        P.generate(other, steps=STEPS)  # ... but its timestep is a view of another scheduler's timesteps
    assert e.value.code is ErrorCode.STEP_UNTRACKED and "view of another tensor" in str(e.value)
    bcc.compile(other, fast.unet.bcc_plan)  # attaching it makes it work, sharing the compiled denoiser
    assert other.unet is fast.unet
    ref_other = P._from_pipe("StableDiffusionImg2ImgPipeline", P.sd(0))
    ref_other.scheduler = EulerDiscreteScheduler.from_config(fast.scheduler.config)
    with P.PipelineCachingReference(ref_other, rows_of(fast, ref_other)):
        close(P.generate(other, steps=STEPS), P.generate(ref_other, steps=STEPS), exact=True)


def test_check_mode_agrees_with_the_schedulers_own_step_index():
    fast = bcc.compile(P.sdxl(0), plan_for(P.sdxl(0)), backend="eager", check=True)  # Euler: has step_index
    for steps in (STEPS, 7):
        P.generate(fast, steps=steps)
    P.generate(P.sdxl_img2img(fast), steps=10, strength=0.6)


# -- calibrating a pipeline ---------------------------------------------------------------------
def test_calibrate_a_pipeline_then_serve_another_step_count():
    pipe = P.sd(0)
    profile = bcc.calibrate(pipe, ["a red 3", "a blue 7"], seeds=[0, 1], num_inference_steps=STEPS,
                            guidance_scale=5.0, progress=False, height=16, width=16)
    assert profile.num_steps == STEPS and profile.num_runs == 4 and tuple(profile.extra["streams"]) == (0,)
    assert [n for _a, n in P.default_blocks(pipe)] == list(profile.block_names)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # the denoiser is put back
    fast = bcc.compile(pipe, bcc.Plan(profile, budget=0.8), backend="eager")
    with reference_of(fast, "sd") as (ref_pipe, _ref):
        for steps in (STEPS, 9):
            close(P.generate(fast, steps=steps), P.generate(ref_pipe, steps=steps), exact=True)


def test_calibrate_true_cfg_measures_each_stream_against_itself():
    pipe = P.flux(0)
    kw = dict(true_cfg_scale=2.0, negative_prompt=P.NEGATIVE, height=16, width=16, max_sequence_length=P.TEXT_LEN)
    profile = bcc.calibrate(pipe, ["a red 3"], seeds=[0], num_inference_steps=4, progress=False, **kw)
    assert tuple(profile.extra["streams"]) == (0, 1) and profile.num_steps == 4
    per_stream = torch.tensor(profile.extra["per_stream_l1_rel"], dtype=torch.float64)
    torch.testing.assert_close(per_stream.mean(0), profile.l1_rel)
    # Interleaved calls (counted as steps) would compare cond with uncond: far larger "change".
    single = bcc.calibrate(pipe.transformer, lambda m, p, s: pipe(prompt=p, num_inference_steps=4,
                           generator=torch.Generator().manual_seed(s), output_type="latent", **kw),
                           ["a red 3"], seeds=[0], progress=False)
    assert single.num_steps == 8
    assert float(per_stream[:, 1:].mean()) < float(single.l1_rel[1:].mean())


def test_calibrate_img2img_covers_the_steps_it_ran():
    pipe = P.sd_img2img(seed=0)
    profile = bcc.calibrate(pipe, ["a red 3"], seeds=[0], num_inference_steps=STEPS, guidance_scale=5.0,
                            progress=False, height=16, width=16, image=P.init_image(16), strength=0.6)
    assert profile.num_steps == STEPS and profile.active_steps == (3, STEPS)  # DDIM at 0.6: steps 3, 4, 5
    assert not profile.l1_rel[:4].any() and profile.l1_rel[4:].all()
    schedule = bcc.Plan(profile, budget=0.9).schedule_for(STEPS)  # of 3 steps: the first computes everything
    assert schedule.mask[:4].all() and not schedule.mask[4:].all() and schedule.compute_fraction() <= 0.9


def _measured_by_hooks(pipe, attr, blocks, **kw):
    """Independent of calibrate: each block's residual (output - input) at every call of
    pipe.<attr>; with two calls a step for the whole generation (Wan guidance), call i of
    the pipeline is step i // 2, stream i % 2. Returns ({step: l1_rel row}, steps run)."""
    calls, handles, residuals = [], [], {}
    model = getattr(pipe, attr)
    for a in P.denoiser_attrs(pipe):
        handles.append(getattr(pipe, a).register_forward_pre_hook(lambda m, args, k, a=a: calls.append(a),
                                                                   with_kwargs=True))
    for j, name in enumerate(blocks):
        def hook(m, args, kwargs, out, j=j):
            x = args[0] if args else kwargs["hidden_states"]
            if calls[-1] == attr:
                residuals[(len(calls) - 1, j)] = (out - x).double()
        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        P.generate(pipe, steps=STEPS, **kw)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2 * STEPS
    mine = [i for i, a in enumerate(calls) if a == attr]
    ran = sorted({i // 2 for i in mine})
    rows = {}
    for step in ran[1:]:
        per_stream = [[float((residuals[(2 * step + k, j)] - residuals[(2 * step - 2 + k, j)]).abs().sum()
                             / residuals[(2 * step + k, j)].abs().sum()) for j in range(len(blocks))]
                      for k in (0, 1)]
        rows[step] = [(a + b) / 2 for a, b in zip(*per_stream)]
    return rows, ran


def test_calibrate_each_wan22_expert_over_the_steps_it_runs():
    _name, build_kw, kw = TWO_CALLS["wan22_two_experts"]
    pipe = P.wan(0, **build_kw)
    calib = dict(seeds=[0], num_inference_steps=STEPS, progress=False, height=16, width=16, num_frames=9,
                 max_sequence_length=P.TEXT_LEN, **kw)
    with pytest.raises(BccError) as e:
        bcc.calibrate(pipe, [list(P.PROMPTS)], **calib)
    assert e.value.code is ErrorCode.CALIBRATION_INVALID and "denoiser=" in str(e.value)
    attrs = ("transformer", "transformer_2")
    profiles = {a: bcc.calibrate(pipe, [list(P.PROMPTS)], denoiser=a, **calib) for a in attrs}  # one batch
    hi, lo = profiles["transformer"], profiles["transformer_2"]
    assert [type(getattr(pipe, a)).__name__ for a in attrs] == ["WanTransformer3DModel"] * 2  # put back
    # The experts split the steps: the high-noise one runs first, the low-noise one to the end.
    assert hi.active_steps[0] == 0 and hi.active_steps[1] == lo.active_steps[0] and lo.active_steps[1] == STEPS
    assert 0 < lo.active_steps[0] < STEPS and tuple(hi.extra["streams"]) == tuple(lo.extra["streams"]) == (0, 1)
    assert (hi.extra["denoiser"], lo.extra["denoiser"]) == attrs
    for attr, profile in profiles.items():
        rows, ran = _measured_by_hooks(P.wan(0, **build_kw), attr, profile.block_names, **kw)
        assert ran == list(profile.steps_run)
        want = torch.zeros(STEPS, profile.num_blocks, dtype=torch.float64)
        for step, row in rows.items():
            want[step] = torch.tensor(row, dtype=torch.float64)
        torch.testing.assert_close(profile.l1_rel, want, rtol=1e-5, atol=1e-9)
    # One plan per expert; a plan calibrated on the other expert is refused, not followed.
    with pytest.raises(BccError) as e:
        bcc.compile(P.wan(0, **build_kw), bcc.Plan(hi, budget=0.7), backend="eager")
    assert e.value.code is ErrorCode.CONFIG_INVALID and "denoiser='transformer_2'" in str(e.value)
    plans = {a: bcc.Plan(p, budget=0.7) for a, p in profiles.items()}
    fast = bcc.compile(pipe, plans, backend="eager")
    for attr, profile in profiles.items():
        schedule = getattr(fast, attr).bcc_schedule_for(STEPS)
        assert schedule.active_steps == profile.active_steps and schedule.compute_fraction() <= 0.7
        assert schedule.mask[:profile.active_steps[0]].all()  # steps it does not run: compute, never reuse
    with reference_of(fast, "wan", **build_kw) as (ref_pipe, ref):
        for steps in (STEPS, 9):
            close(P.generate(fast, steps=steps, **kw), P.generate(ref_pipe, steps=steps, **kw), exact=True)
    own = {a: [i for i, (b, _n) in enumerate(ref.blocks) if b == a] for a in attrs}
    reused = {a for *_x, a, r in ref.trace if sorted(r) != own[a]}
    assert reused == set(attrs)  # each expert really reused blocks
    assert getattr(fast, "transformer_2").bcc_schedule_for(9).active_steps[1] == 9


# -- the README's headline example runs as written ----------------------------------------------
def test_the_readme_pipelines_example_runs_as_written(monkeypatch):
    import pathlib
    import re

    from diffusers import StableDiffusionPipeline

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Pipelines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    tiny = P.sd(0)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # as written: real step counts, no example inputs
    assert scope["pipe"] is tiny and isinstance(tiny.unet, bcc.BccModule)
    assert tiny.unet.bcc_stats()["step_counts"] >= 2


def test_a_callback_that_halves_the_batch_mid_generation_is_refused_not_wrong():
    from diffusers.callbacks import SDCFGCutoffCallback

    fast = compiled("sd")
    kw = dict(steps=STEPS, prompt="a red 3", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    with pytest.raises(BccError) as e:
        P.generate(fast, **kw)
    assert e.value.code is ErrorCode.SIGNATURE_CHANGED and "stream 0" in str(e.value)
    with reference_of(fast, "sd") as (ref_pipe, _ref):  # the next generation is intact
        close(P.generate(fast, steps=STEPS), P.generate(ref_pipe, steps=STEPS), exact=True)


@pytest.mark.parametrize("scheduler", ["pndm", "heun"])
def test_schedulers_with_other_step_counts_and_no_begin_index(scheduler):
    # PNDM (SD 1.5's): 6 steps are 7 timesteps [830, 664, 664, ...] and it has no set_begin_index;
    # img2img at strength 0.7 starts at the second 664 (position 2). Heun: 2N - 1 = 11 steps.
    from diffusers import HeunDiscreteScheduler, PNDMScheduler

    def make():
        return PNDMScheduler(skip_prk_steps=True) if scheduler == "pndm" else HeunDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    fast = bcc.compile(P.sd(0, scheduler=make()), plan_for(P.sd(0)), backend="eager")
    ref_pipe = P.sd(0, scheduler=make())
    with P.PipelineCachingReference(ref_pipe, rows_of(fast, ref_pipe)) as ref:
        close(P.generate(fast, steps=STEPS), P.generate(ref_pipe, steps=STEPS), exact=True)
        close(P.generate(P.sd_img2img(fast), steps=STEPS, strength=0.7),
              P.generate(P.sd_img2img(ref_pipe), steps=STEPS, strength=0.7), exact=True)
    total = 7 if scheduler == "pndm" else 2 * STEPS - 1
    assert {n for _g, _s, n, *_r in ref.trace} == {total} and fast.unet.bcc_stats()["step_counts"] == 1
    if scheduler == "pndm":
        assert [s for g, s, *_r in ref.trace if g == 2] == [2, 3, 4, 5, 6]
