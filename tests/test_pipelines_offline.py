"""Tiny offline diffusers pipelines (tests/pipelines.py): they build, generate
deterministically and run the flows that break call counting; and the independent
pipeline caching reference follows the scheduler's step identity and equals the plain
pipeline under an all-True schedule."""
import contextlib

import pytest
import torch

import pipelines as P

STEPS = 6
ALL = pytest.mark.parametrize("name", sorted(P.BUILDERS))


_BUILT: dict = {}


_one_thread = pytest.fixture(autouse=True)(P.one_thread)


def built(name: str, **kwargs):
    """Session-shared pipeline (tests that change a pipeline build their own)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = P.BUILDERS[name](0, **kwargs)
    return _BUILT[key]


@contextlib.contextmanager
def denoiser_calls(pipe):
    """Record (attribute, batch, kwargs) of every denoiser call."""
    calls, handles = [], []
    for attr in P.denoiser_attrs(pipe):
        def hook(module, args, kwargs, attr=attr):
            x = args[0] if args else kwargs["hidden_states"]
            calls.append((attr, x.shape[0], kwargs))
        handles.append(getattr(pipe, attr).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def all_true(pipe_or_ref):
    return lambda step, num_steps: [True] * len(P.default_blocks(pipe_or_ref))


def reference_run(pipe, schedule=None, **kw):
    with P.PipelineCachingReference(pipe, schedule or all_true(pipe)) as ref:
        out = P.generate(pipe, **kw)
    return out, ref


# -- the builders -------------------------------------------------------------------------
@ALL
def test_builder_is_deterministic_and_generates(name):
    builder = P.BUILDERS[name]
    assert builder.__doc__ and "\n" not in builder.__doc__.strip()
    pipe = built(name)
    a = P.generate(pipe, steps=STEPS)
    b = P.generate(pipe, steps=STEPS)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(P.generate(builder(0), steps=STEPS), a)  # same seed, same pipeline
    assert not torch.equal(P.generate(builder(1), steps=STEPS), a)
    with denoiser_calls(pipe) as calls:
        P.generate(pipe, steps=STEPS)
    assert len(calls) == STEPS  # one batched (CFG) call per step, or no CFG (Wan at guidance 1)


@ALL
def test_pixel_output(name):
    images = P.generate(built(name), steps=2, output_type="np")
    assert images.shape[0] == 2 and images.shape[-1] == 3 and (images >= 0).all() and (images <= 1).all()


@pytest.mark.parametrize("steps", [3, 9])
def test_another_step_count(steps):
    pipe = built("sd")
    with denoiser_calls(pipe) as calls:
        out = P.generate(pipe, steps=steps)
    assert len(calls) == steps and len(pipe.scheduler.timesteps) == steps and torch.isfinite(out).all()


# strength 0.6 of 6 steps: SD/SDXL skip int(6 - int(6 * 0.6)) = 3 timesteps, SD3/Flux
# int(6 - 6 * 0.6) = int(2.4) = 2 (no inner int()): 3 and 4 steps run.
@pytest.mark.parametrize("variant,runs", [("sd_img2img", 3), ("sdxl_img2img", 3), ("sd3_img2img", 4),
                                          ("flux_img2img", 4)])
def test_img2img_from_pipe_shares_modules_and_runs_fewer_steps(variant, runs):
    base = P.BUILDERS[variant.removesuffix("_img2img")](0)
    pipe = getattr(P, variant)(base)
    attr = P.denoiser_attrs(base)[0]
    assert getattr(pipe, attr) is getattr(base, attr) and pipe.scheduler is base.scheduler
    with denoiser_calls(pipe) as calls:
        a = P.generate(pipe, steps=STEPS, strength=0.6)
    assert len(calls) == runs
    assert torch.equal(P.generate(pipe, steps=STEPS, strength=0.6), a)
    if hasattr(pipe.scheduler, "set_begin_index"):
        assert pipe.scheduler.begin_index == STEPS - runs


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "wan"])
def test_interrupt_at_step_2_then_a_full_generation(name):
    pipe = P.BUILDERS[name](0)
    full = P.generate(pipe, steps=STEPS)
    with denoiser_calls(pipe) as calls:
        P.generate(pipe, steps=STEPS, callback_on_step_end=P.interrupt_at(2))
    assert len(calls) == 3 and pipe.interrupt
    assert torch.equal(P.generate(pipe, steps=STEPS), full)  # __call__ resets _interrupt


@pytest.mark.parametrize("name", ["sd", "sd3", "flux", "wan"])
def test_exception_in_callback_leaves_the_next_generation_intact(name):
    pipe = P.BUILDERS[name](0)
    full = P.generate(pipe, steps=STEPS)
    with pytest.raises(RuntimeError, match="callback failed"):
        P.generate(pipe, steps=STEPS, callback_on_step_end=P.raise_at(2))
    assert torch.equal(P.generate(pipe, steps=STEPS), full)


def test_pixart_has_only_the_legacy_callback():
    pipe = built("pixart_sigma")
    with denoiser_calls(pipe) as calls:  # swallowed by **kwargs: no interrupt, no error
        P.generate(pipe, steps=STEPS, callback_on_step_end=P.interrupt_at(2))
    assert len(calls) == STEPS and not hasattr(pipe, "_interrupt")
    with pytest.raises(RuntimeError, match="callback failed"):
        P.generate(pipe, steps=STEPS, callback=lambda i, t, latents: P.raise_at(2)(pipe, i, t, {}))


def test_flux_true_cfg_calls_the_transformer_twice_per_step():
    pipe = built("flux")
    plain = P.generate(pipe, steps=STEPS)
    with denoiser_calls(pipe) as calls:
        cfg = P.generate(pipe, steps=STEPS, true_cfg_scale=2.0, negative_prompt=P.NEGATIVE)
    assert len(calls) == 2 * STEPS and not torch.equal(cfg, plain)
    pos, neg = calls[0][2]["encoder_hidden_states"], calls[1][2]["encoder_hidden_states"]
    assert pos.shape == neg.shape and not torch.equal(pos, neg)


def test_wan_guidance_calls_the_transformer_twice_per_step():
    pipe = built("wan")
    with denoiser_calls(pipe) as calls:
        out = P.generate(pipe, steps=STEPS, guidance_scale=3.0, negative_prompt=P.NEGATIVE)
    assert len(calls) == 2 * STEPS and torch.isfinite(out).all()
    assert {b for _a, b, _k in calls} == {2}  # cond and uncond are separate calls at the full batch


def test_wan22_switches_to_transformer_2_at_the_boundary():
    pipe = built("wan", two_experts=True)
    with denoiser_calls(pipe) as calls:
        P.generate(pipe, steps=STEPS, guidance_scale=3.0, guidance_scale_2=2.0, negative_prompt=P.NEGATIVE)
    attrs = [a for a, _b, _k in calls]
    assert len(attrs) == 2 * STEPS and attrs[0] == "transformer" and attrs[-1] == "transformer_2"
    assert attrs == sorted(attrs)  # high-noise expert first, then the low-noise one


def test_sd3_skip_layer_guidance_adds_a_call_with_skip_layers():
    pipe = built("sd3")
    plain = P.generate(pipe, steps=STEPS)
    with denoiser_calls(pipe) as calls:
        slg = P.generate(pipe, steps=STEPS, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                         skip_layer_guidance_stop=0.5)
    skips = [(b, k.get("skip_layers")) for _a, b, k in calls]
    # i > 6 * 0.0 and i < 6 * 0.5: steps 1 and 2 get a second call, conditional half only, with skip_layers
    assert skips == [(4, None), (4, None), (2, [1]), (4, None), (2, [1]), (4, None), (4, None), (4, None)]
    assert not torch.equal(slg, plain)


def test_sd_freeu_changes_the_output_and_disable_restores_it():
    pipe = P.sd(0)
    plain = P.generate(pipe, steps=STEPS)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert all(getattr(b, "b1", None) == 1.2 for b in pipe.unet.up_blocks)
    freeu = P.generate(pipe, steps=STEPS)
    pipe.disable_freeu()
    assert not torch.equal(freeu, plain) and torch.equal(P.generate(pipe, steps=STEPS), plain)


# -- the independent caching reference -------------------------------------------------------
@ALL
def test_reference_all_true_equals_plain_exactly(name):
    pipe = built(name)
    plain = P.generate(pipe, steps=STEPS)
    out, ref = reference_run(pipe, steps=STEPS)
    assert torch.equal(out, plain)
    assert [(s, n, k) for _g, s, n, k, _a, _r in ref.trace] == [(s, STEPS, 0) for s in range(STEPS)]
    assert all(r == list(range(len(ref.blocks))) for *_x, r in ref.trace)  # default_blocks: execution order
    assert not any(k in vars(pipe.scheduler) for k in ("set_timesteps", "set_begin_index", "step"))
    assert torch.equal(P.generate(pipe, steps=STEPS), plain)  # removed cleanly


FLOWS = {
    "img2img": ("sd_img2img", dict(strength=0.6)),
    "sdxl_img2img": ("sdxl_img2img", dict(strength=0.6)),
    "flux_true_cfg": ("flux", dict(true_cfg_scale=2.0, negative_prompt=P.NEGATIVE)),
    "wan_cfg": ("wan", dict(guidance_scale=3.0, negative_prompt=P.NEGATIVE)),
    "sd3_slg": ("sd3", dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5)),
    "steps_9": ("sd", dict(steps=9)),
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_reference_all_true_equals_plain_in_every_flow(flow):
    name, kw = FLOWS[flow]
    pipe = getattr(P, name)(seed=0) if name.endswith("img2img") else built(name)
    kw = {"steps": STEPS, **kw}
    plain = P.generate(pipe, **kw)
    out, _ref = reference_run(pipe, **kw)
    assert torch.equal(out, plain)


def test_reference_all_true_with_freeu_and_heun():
    from diffusers import HeunDiscreteScheduler

    pipe = P.sd(0, scheduler=HeunDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012))
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    plain = P.generate(pipe, steps=STEPS)
    out, ref = reference_run(pipe, steps=STEPS)
    assert torch.equal(out, plain)
    # Heun: 2 * 6 - 1 timesteps, one denoiser call and one step() each
    assert [(s, n) for _g, s, n, *_r in ref.trace] == [(s, 2 * STEPS - 1) for s in range(2 * STEPS - 1)]


def _steps_streams(ref):
    return [(s, k) for _g, s, _n, k, _a, _r in ref.trace]


def test_reference_step_identity_in_each_flow():
    # img2img: DDIM has no set_begin_index, so the begin is the first timestep's position
    _out, ref = reference_run(P.sd_img2img(seed=0), steps=STEPS, strength=0.6)
    assert _steps_streams(ref) == [(3, 0), (4, 0), (5, 0)]
    _out, ref = reference_run(P.sdxl_img2img(seed=0), steps=10, strength=0.6)  # Euler: set_begin_index(4)
    assert _steps_streams(ref) == [(s, 0) for s in range(4, 10)]
    # PNDM (SD 1.5's scheduler): 6 steps are 7 timesteps [830, 664, 664, 498, ...]; strength 0.7
    # starts at the second 664, position 2 (a search by value would say 1)
    from diffusers import PNDMScheduler

    pndm = P.sd_img2img(P.sd(0, scheduler=PNDMScheduler(skip_prk_steps=True)))
    _out, ref = reference_run(pndm, steps=STEPS, strength=0.7)
    assert [(s, n) for _g, s, n, *_r in ref.trace] == [(s, 7) for s in range(2, 7)]
    _out, ref = reference_run(built("flux"), steps=STEPS, true_cfg_scale=2.0, negative_prompt=P.NEGATIVE)
    assert _steps_streams(ref) == [(s, k) for s in range(STEPS) for k in (0, 1)]
    _out, ref = reference_run(built("wan", two_experts=True), steps=STEPS, guidance_scale=3.0,
                              guidance_scale_2=2.0, negative_prompt=P.NEGATIVE)
    assert _steps_streams(ref) == [(s, k) for s in range(STEPS) for k in (0, 1)]
    assert {a for *_x, a, _r in ref.trace} == {"transformer", "transformer_2"}
    # SD3 skip-layer guidance: stream 1 appears at step 1 and recomputes there although
    # the schedule says reuse; the skipped block is never called in stream 1.
    pipe = built("sd3")
    reuse = lambda step, num_steps: [step == 0] * 2  # noqa: E731
    _out, ref = reference_run(pipe, reuse, steps=STEPS, skip_guidance_layers=[1],
                              skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.5)
    assert [(s, k, r) for _g, s, _n, k, _a, r in ref.trace] == [
        (0, 0, [0, 1]), (1, 0, []), (1, 1, [0]), (2, 0, []), (2, 1, []), (3, 0, []), (4, 0, []), (5, 0, [])]


def test_reference_interrupt_and_exception_start_fresh_generations():
    pipe = P.sd(0)
    schedule = P.every(3, len(P.default_blocks(pipe)))
    with P.PipelineCachingReference(pipe, schedule) as ref:
        want = P.generate(pipe, steps=STEPS)
        P.generate(pipe, steps=STEPS, callback_on_step_end=P.interrupt_at(2))
        assert [s for g, s, *_r in ref.trace if g == 2] == [0, 1, 2]
        assert torch.equal(P.generate(pipe, steps=STEPS), want)
        with pytest.raises(RuntimeError):
            P.generate(pipe, steps=STEPS, callback_on_step_end=P.raise_at(4))
        assert torch.equal(P.generate(pipe, steps=STEPS), want)
        assert ref.generation == 5
    assert not torch.equal(P.generate(pipe, steps=STEPS), want)  # the schedule really reuses


def test_reference_serves_any_step_count_and_from_pipe_sharing():
    base = P.sd(0)
    img2img = P.sd_img2img(base)
    schedule = P.every(2, len(P.default_blocks(base)))
    with P.PipelineCachingReference(base, schedule) as ref:
        first = P.generate(base, steps=STEPS)
        P.generate(img2img, steps=STEPS, strength=0.6)  # same denoiser, same scheduler
        P.generate(base, steps=9)
        assert torch.equal(P.generate(base, steps=STEPS), first)
        recomputed = [(s, n, bool(r)) for _g, s, n, _k, _a, r in ref.trace]
    assert recomputed[:STEPS] == [(s, STEPS, s % 2 == 0) for s in range(STEPS)]
    assert recomputed[STEPS:STEPS + 3] == [(3, STEPS, True), (4, STEPS, True), (5, STEPS, False)]
    assert recomputed[STEPS + 3:STEPS + 12] == [(s, 9, s % 2 == 0) for s in range(9)]


@pytest.mark.parametrize("name,block,kw", [
    ("sd3", "transformer_blocks.0", {}),  # joint block: (encoder, hidden) outputs
    ("flux", "single_transformer_blocks.0", dict(true_cfg_scale=2.0, negative_prompt=P.NEGATIVE)),  # 2 streams
])
def test_reference_reuse_adds_each_streams_own_cached_residual(name, block, kw):
    pipe = built(name)
    streams = 2 if kw else 1
    seen = []

    def hook(module, args, kwargs, out):
        seen.append((kwargs["hidden_states"], kwargs["encoder_hidden_states"], out))

    handle = pipe.transformer.get_submodule(block).register_forward_hook(hook, with_kwargs=True)
    try:
        n = len(P.default_blocks(pipe))
        _out, ref = reference_run(pipe, lambda step, num_steps: [step == 0] * n, steps=2, **kw)
    finally:
        handle.remove()
    assert len(seen) == 2 * streams and all(r == [] for *_x, r in ref.trace[streams:])
    for k in range(streams):  # step 1 of stream k reuses what step 0 of stream k cached
        (h0, e0, (eo0, ho0)), (h1, e1, (eo1, ho1)) = seen[k], seen[streams + k]
        assert not torch.equal(h0, h1)
        assert torch.equal(ho1, h1 + (ho0 - h0)) and torch.equal(eo1, e1 + (eo0 - e0))
    if streams == 2:
        assert not torch.equal(seen[0][1], seen[1][1])  # the streams' text differs, so do their caches


def test_reference_on_a_cfg_cutoff_callback_that_halves_the_batch():
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = built("sd")
    kw = dict(steps=STEPS, prompt="a red 3", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    with denoiser_calls(pipe) as calls:
        plain = P.generate(pipe, **kw)
    assert [b for _a, b, _k in calls] == [2, 2, 2, 2, 1, 1]  # CFG off after step 3
    assert torch.equal(reference_run(pipe, **kw)[0], plain)
    n = len(P.default_blocks(pipe))
    with pytest.raises(RuntimeError, match="shapes changed"):
        reference_run(pipe, P.every(3, n), **kw)
    with P.PipelineCachingReference(pipe, P.every(3, n), on_shape_change="recompute") as ref:
        P.generate(pipe, **kw)
    assert [bool(r) for *_x, r in ref.trace] == [True, False, False, True, True, False]


def test_reference_refuses_a_replaced_scheduler():
    from diffusers import EulerDiscreteScheduler

    pipe = P.sd(0)
    with P.PipelineCachingReference(pipe, all_true(pipe)):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with pytest.raises(RuntimeError, match="replaced"):
            P.generate(pipe, steps=2)


def test_reference_refuses_a_denoiser_driven_by_an_unwrapped_scheduler():
    from diffusers import EulerDiscreteScheduler

    base = P.sd(0)
    other = P._from_pipe("StableDiffusionImg2ImgPipeline", base)
    other.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)  # = from_pipe(..., scheduler=)
    assert other.unet is base.unet and other.scheduler is not base.scheduler
    with P.PipelineCachingReference(base, all_true(base)):
        with pytest.raises(RuntimeError, match="set_timesteps"):
            P.generate(other, steps=2)
        P.generate(base, steps=2)
        with pytest.raises(RuntimeError, match="did not wrap"):
            P.generate(other, steps=2)
