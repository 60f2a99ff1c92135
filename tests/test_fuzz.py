"""Differential fuzzing: the inductor-compiled rewrite always equals the hook reference.

Hypothesis draws a configuration (which blocks, residual or output mode, step count,
batch size, classifier-free guidance) and a seed for several random schedules. Compiling is
the expensive part, so a :class:`BccModule` is built once per (model, blocks, mode,
steps); batch and guidance are new input signatures inside it (its cache entries), and
schedules are swapped with ``set_schedule``, which recompiles nothing.

CI runs a few small configurations; ``BCC_FUZZ_EXAMPLES=N`` runs N per model, with
up to every candidate block and more schedules each
(e.g. ``BCC_FUZZ_EXAMPLES=40 pytest tests/test_fuzz.py``).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import bcc
from bcc import Schedule
from bcc.tools import zoo

from testing import built, reference_outputs, run

EXAMPLES = int(os.environ.get("BCC_FUZZ_EXAMPLES", "0"))
# CI budget: a tiny UNet compiles in ~15-25 s on one core, a tiny DiT in ~5-10 s, and
# more gated blocks compile longer.
CI_CONFIGS = {"unet-tiny": 1, "pixart": 2, "dit": 1}
CI_MAX_BLOCKS = 3
SCHEDULES_PER_CONFIG = 6 if EXAMPLES else 3
COMPILED_TOL = dict(rtol=1e-4, atol=1e-4)

# Candidate blocks, none nested in another: attention, ResNet and resampler stages of
# the UNet; every top-level stage of the DiTs, including multi-output (adaln_single)
# and shape-changing ones (pos_embed, proj_out) that are cached whole.
POOLS = {
    "unet-tiny": (
        "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.downsamplers.0",
        "down_blocks.1.resnets.0", "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
        "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
    ),
    "pixart": ("pos_embed", "adaln_single", "caption_projection", "transformer_blocks.0",
               "transformer_blocks.1", "proj_out"),
    "dit": ("pos_embed", "transformer_blocks.0", "transformer_blocks.1", "proj_out_1"),
}

# Found by this test: a gated block whose input is also a skip connection (inductor
# wrote the cat into the operand's buffer and broke the branch's strides).
SKIP_INPUT = {"blocks": ("down_blocks.0.downsamplers.0", "up_blocks.0.resnets.0"), "mode": "residual",
              "num_steps": 3, "batch": 1, "guidance": True}


def _guided(value, key, batch):
    # Classifier-free guidance batches the unconditional and conditional halves in one
    # call; the unconditional half gets empty (zero) text conditioning.
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return value
    first = torch.zeros_like(value) if key == "encoder_hidden_states" else value
    return torch.cat([first, value])


def _trajectory(name, model, num_steps, batch, guidance):
    spec = zoo.spec_of(model)
    extra, latent = spec.extra, spec.latent
    steps = []
    for s in range(num_steps):
        args, kwargs = zoo.step_inputs(name, model, extra, latent=latent, batch=batch, step=s, num_steps=num_steps)
        if guidance:
            args = tuple(_guided(a, None, batch) for a in args)
            kwargs = {k: _guided(v, k, batch) for k, v in kwargs.items()}
        steps.append((args, kwargs))
    return steps


@st.composite
def _configs(draw, name):
    pool = POOLS[name]
    most = len(pool) if EXAMPLES else CI_MAX_BLOCKS
    blocks = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=most, unique=True))
    return {
        "blocks": tuple(b for b in pool if b in blocks),
        "mode": draw(st.sampled_from(["residual", "output"])),
        "num_steps": draw(st.integers(2, 6)),
        "batch": draw(st.integers(1, 2)),
        "guidance": draw(st.booleans()),
    }


def _random_schedules(seed, num_steps, blocks, count):
    """``count`` random schedules, each with its own recompute density."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        density = float(torch.rand((), generator=g))
        mask = torch.rand(num_steps, len(blocks), generator=g) < density
        mask[0] = True
        out.append(Schedule(mask, blocks))
    return out


def _explicit(name):
    return example(config=SKIP_INPUT, seed=0) if name == "unet-tiny" else (lambda f: f)


@pytest.mark.parametrize("name", ["unet-tiny", "pixart", "dit"])
def test_compiled_equals_reference_on_random_configs(name):
    model, _args, _kwargs = built(name)
    compiled: dict[tuple, bcc.BccModule] = {}

    # No shrinking: every shrink step would compile another model; the failing
    # configuration and seed are printed as drawn.
    # CI draws the same few configurations every run (derandomize), so a landing is not a
    # coin toss; BCC_FUZZ_EXAMPLES=N draws fresh ones. What a fresh draw found has a
    # test of its own (test_whole_cache_holds_the_block_output_under_inductor).
    @settings(max_examples=EXAMPLES or CI_CONFIGS[name], deadline=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=list(HealthCheck), print_blob=True, derandomize=not EXAMPLES)
    @given(config=_configs(name), seed=st.integers(0, 2**31 - 1))
    @_explicit(name)
    def check(config, seed):
        blocks, mode, num_steps = config["blocks"], config["mode"], config["num_steps"]
        inputs = _trajectory(name, model, num_steps, config["batch"], config["guidance"])
        key = (blocks, mode, num_steps)
        if key not in compiled:
            compiled[key] = bcc.compile(model, Schedule.all_compute(num_steps, blocks), mode=mode)
        fast = compiled[key]
        fast.set_schedule(Schedule.all_compute(num_steps, blocks))
        for g, w in zip(run(fast, inputs), run(model, inputs), strict=True):
            torch.testing.assert_close(g, w, **COMPILED_TOL)
        for schedule in _random_schedules(seed, num_steps, blocks, SCHEDULES_PER_CONFIG):
            fast.set_schedule(schedule)
            got = run(fast, inputs)
            for s, (g, w) in enumerate(zip(got, reference_outputs(model, schedule, inputs, mode), strict=True)):
                torch.testing.assert_close(g, w, **COMPILED_TOL, msg=lambda m: f"step {s}: {m}")

    check()


def test_whole_cache_holds_the_block_output_under_inductor():
    """Found by the fuzz test: with the cache taken from the cond's branch copy, inductor left
    the input of proj_out (a value computed after the block) in the cache of a transformer
    block cached whole, on the tiny PixArt at batch 1; every reuse was wrong by O(1)."""
    model, _args, _kwargs = built("pixart")
    inputs = _trajectory("pixart", model, 3, 1, False)
    schedule = Schedule(torch.tensor([[True], [False], [True]]), ["transformer_blocks.1"])
    fast = bcc.compile(model, schedule, mode="output")
    for g, w in zip(run(fast, inputs), reference_outputs(model, schedule, inputs, "output"), strict=True):
        torch.testing.assert_close(g, w, **COMPILED_TOL)


def test_whole_cache_with_scale_shift_holds_the_block_output_under_inductor():
    """The same defect with scale-shift (a reused output there is the corrected cache, so the
    cache cannot be the output): random corrections, reused twice, against the hook reference."""
    model, _args, _kwargs = built("pixart")
    inputs = _trajectory("pixart", model, 3, 1, False)
    schedule = Schedule(torch.tensor([[True], [False], [False]]), ["transformer_blocks.1"])
    probe = bcc.compile(model, schedule, backend="eager", mode="output")
    run(probe, inputs[:1])
    ss = bcc.ScaleShift.for_graph(schedule, probe.bcc_slots(), model=model, mode="output")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in ss.table:
            t.copy_(0.2 * torch.randn(t.shape, generator=g))
    want = reference_outputs(model, schedule, inputs, "output", scale_shift=ss)
    fast = bcc.compile(model, schedule, mode="output", scale_shift=ss)
    for got, expected in zip(run(fast, inputs), want, strict=True):
        torch.testing.assert_close(got, expected, **COMPILED_TOL)
