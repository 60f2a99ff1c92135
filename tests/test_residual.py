"""The one residual rule (bcc.analyze.residual): golden decisions on analytic blocks, the
graph and eager adapters agreeing, and every user of the rule (the rewrite, the hook
reference, calibration) matching an independent reference that knows each block's
residual streams by their argument roles."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bcc
from bcc import Schedule
from bcc.analyze.recording import BlockResiduals, record_call
from bcc.analyze.residual import decide_residuals
from bcc.errors import BccWarning
from bcc.runtime.reference import HookReference

SHAPE = (2, 4, 6)


class StreamReference:
    """Block caching written out by hand, independent of bcc: output ``j`` of block ``name``
    is cached as ``out_j - bases[name](args, kwargs)[j]`` (whole where that is None) and
    rebuilt as ``base_now + cached``. The step is the number of root calls."""

    def __init__(self, model, schedule, bases):
        self.schedule, self.bases, self.calls = schedule, bases, 0
        self.cache = {}
        self.modules = dict(model.named_modules())
        self.hook = model.register_forward_pre_hook(lambda m, a: setattr(self, "calls", self.calls + 1))
        for i, name in enumerate(schedule.block_names):
            self.modules[name].forward = self._wrap(name, i, self.modules[name].forward)

    def _wrap(self, name, i, forward):
        def wrapped(*args, **kwargs):
            step = (self.calls - 1) % self.schedule.num_steps
            xs = self.bases[name](args, kwargs)
            if bool(self.schedule.mask[step, i]):
                out = forward(*args, **kwargs)
                outs = out if isinstance(out, tuple) else (out,)
                self.cache[name] = (isinstance(out, tuple),
                                    [o - x if x is not None else o.clone() for o, x in zip(outs, xs)])
                return out
            is_tuple, cached = self.cache[name]
            outs = [x + c if x is not None else c.clone() for c, x in zip(cached, xs)]
            return tuple(outs) if is_tuple else outs[0]

        return wrapped

    def remove(self):
        self.hook.remove()
        for name in self.schedule.block_names:
            del self.modules[name].forward


def _with(ref_cls, model, schedule, calls, *extra):
    ref = ref_cls(model, schedule, *extra)
    try:
        with torch.no_grad():
            return [model(*a, **k) for a, k in calls]
    finally:
        ref.remove()


def _flat(outs):
    return [o if isinstance(o, torch.Tensor) else o[0] for o in outs]


def _random_mask(seed, num_steps, num_blocks, density=0.5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_steps, num_blocks, generator=g) < density
    mask[0] = True
    return mask


# -- the rule on analytic blocks ---------------------------------------------------------------
class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class Holder(nn.Module):
    """Calls block ``blk`` and returns its outputs times ``t`` (so every output is used)."""

    def __init__(self, block):
        super().__init__()
        self.blk = block

    def forward(self, *xs):
        *xs, t = xs
        out = self.blk(*xs)
        return tuple(o * t for o in out) if isinstance(out, tuple) else out * t


def _flux_like(split):
    def fn(a, b):
        h = torch.cat([a, b], dim=1)
        h = h + torch.tanh(h) * 0.5
        return split(h)
    return fn


F = torch.nn.functional
BIG = torch.finfo(torch.float32).max  # Flux clips float16 streams to the finite range: an identity
# (name, block, number of inputs, expected base argument per output, unclear?)
GOLDEN = [
    ("mean_shift", lambda a, b: b + 2 * a.mean(-1, keepdim=True), 2, [1], False),
    ("double", lambda x: x * 2, 1, [None], False),
    ("x_plus_x", lambda x: x + x, 1, [None], False),  # the same function as 2x, the same answer
    ("halves", lambda x: 0.5 * x + 0.5 * x + torch.tanh(x), 1, [0], False),
    ("minus", lambda x: x - torch.tanh(x), 1, [0], False),
    ("minus_reversed", lambda x: torch.tanh(x) - x, 1, [None], False),
    ("resnet", lambda x: (x + torch.tanh(x)) / 1.0, 1, [0], False),
    ("double_negation", lambda x: -(-x) + 1, 1, [0], False),
    ("reshape", lambda x: (x.reshape(2, -1) + 1).reshape(SHAPE), 1, [0], False),
    ("other_dtype", lambda x: x.double() + 1, 1, [None], False),
    ("eval_dropout_clamp", lambda x: F.dropout(x, 0.5, training=False).clamp(-BIG, BIG) + torch.tanh(x), 1,
     [0], False),
    ("in_place", lambda x: x.clone().add_(torch.tanh(x)), 1, [0], False),
    ("second_input", lambda a, b: (torch.tanh(a) + b, a * 3), 2, [1, None], False),
    ("transposed_path", lambda x: (x.transpose(1, 2) + 1).transpose(1, 2), 1, [None], False),  # not followed
    ("cat_slices", _flux_like(lambda h: (h[:, :4], h[:, 4:])), 2, [0, 1], False),
    ("cat_split", _flux_like(lambda h: tuple(h.split([4, 4], dim=1))), 2, [0, 1], False),
    ("cat_chunk_swapped", _flux_like(lambda h: tuple(reversed(h.chunk(2, dim=1)))), 2, [1, 0], False),
    ("cat_narrow", _flux_like(lambda h: h.narrow(1, 4, 4)), 2, [1], False),
    ("cat_straddle", _flux_like(lambda h: h[:, 2:6]), 2, [None], True),
    ("two_streams", lambda a, b: a + b, 2, [0], False),  # the identity path is a + b: residual 0
    ("shared_skip", lambda a, b: a + b + torch.tanh(a + b), 2, [0], False),  # Cosmos: x + e + f(x + e)
]


@pytest.mark.parametrize("name, fn, n_in, bases, unclear", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_decisions_agree_in_the_graph_and_in_eager(name, fn, n_in, bases, unclear):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(SHAPE, generator=g) for _ in range(n_in)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, slots, _ = BlockResiduals().call("blk", Fn(fn), tuple(xs), {})
        eager = [s.base for s in slots]
        model = bcc.compile(Holder(Fn(fn)), Schedule.every(2, 2, ["blk"]), backend="eager")
        model(*xs, torch.tensor(2.0))
    assert eager == bases
    ours = [w for w in caught if issubclass(w.category, BccWarning)]
    assert len(ours) == (2 * bases.count(None) if unclear else 0)  # once in eager, once in the graph
    assert all("block 'blk'" in str(w.message) for w in ours)
    # The graph numbers its inputs and outputs its own way; the residual streams agree.
    streams = lambda ss: sorted(-1 if s.stream is None else s.stream for s in ss)  # noqa: E731
    assert streams(model.bcc_slots()) == streams(slots)
    assert [s.base is None for s in model.bcc_slots()].count(True) == bases.count(None)
    assert sorted(len(s.also) for s in model.bcc_slots()) == sorted(len(s.also) for s in slots)


def test_the_rule_reads_a_recorded_call_once_per_block_and_signature():
    straddle = Fn(_flux_like(lambda h: h[:, 2:6]))  # unclear: each decision warns once
    br = BlockResiduals()
    x = torch.randn(SHAPE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            br.call("blk", straddle, (x, x + 1), {})
        br.call("blk", straddle, (x[:1], x[:1] + 1), {})  # another signature: decided again
    assert sum(issubclass(w.category, BccWarning) for w in caught) == 2
    out, flow = record_call(straddle, (x, x + 1), {})
    assert [r.unclear for r in decide_residuals(flow, warn=False)] == [True]
    assert [r.reason for r in decide_residuals(flow, mode="output")] == ["output mode"]
    block = Fn(lambda a, b: a + b)
    _, slots, _ = BlockResiduals().call("blk", block, (x, x + 1), {})
    assert (slots[0].base, slots[0].also) == (0, (1,))  # two streams: the identity path is their sum
    _, slots, _ = BlockResiduals().call("blk", block, (x, x), {})  # one tensor twice: x + x = 2x
    assert slots[0].base is None


# -- end to end: the crafted block and Flux with as many text as image tokens ---------------------
class MeanShift(nn.Module):
    """Both inputs shaped like the output; only ``b`` is on the identity path."""

    def forward(self, a, b):
        return b + 2 * a.mean(-1, keepdim=True)


class Crafted(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = MeanShift()

    def forward(self, a, b, t):
        return self.blk(a, b) * t + a


def _crafted_calls(num_steps):
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.tensor(1.0 + s)), {})
            for s in range(num_steps)]


def _check_against_reference(model, schedule, calls, bases, reused_tol=None):
    want = _flat(_with(StreamReference, model, schedule, calls, bases))
    with torch.no_grad():
        plain = _flat([model(*a, **k) for a, k in calls])
    assert any(not torch.allclose(w, p, atol=1e-6) for w, p in zip(want, plain))  # something was reused
    hooked = _flat(_with(HookReference, model, schedule, calls))
    with torch.no_grad():
        eager = bcc.compile(model, schedule, backend="eager")
        rewritten = _flat([eager(*a, **k) for a, k in calls])
        compiled = bcc.compile(model, schedule, backend="inductor")
        fast = _flat([compiled(*a, **k) for a, k in calls])
    for s, (w, h, r, c) in enumerate(zip(want, hooked, rewritten, fast)):
        torch.testing.assert_close(h, w, rtol=0, atol=0, msg=lambda m: f"HookReference, step {s}: {m}")
        torch.testing.assert_close(r, w, rtol=0, atol=0, msg=lambda m: f"eager rewrite, step {s}: {m}")
        torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"inductor, step {s}: {m}")
    return want


def test_crafted_block_caches_the_residual_of_its_identity_stream():
    schedule = Schedule(_random_mask(0, 6, 1), ["blk"])
    _check_against_reference(Crafted(), schedule, _crafted_calls(6), {"blk": lambda args, kwargs: [args[1]]})


class SharedSkip(nn.Module):
    """Cosmos's block: a position embedding joins the hidden states on the identity path."""

    def forward(self, x, e):
        h = x + e
        return h + 0.5 * torch.tanh(h)


class WithSharedSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = SharedSkip()

    def forward(self, x, e, t):
        return self.blk(x, e) * t + x


def test_a_block_with_two_inputs_on_its_identity_path_caches_the_residual_of_their_sum():
    schedule = Schedule(_random_mask(2, 6, 1), ["blk"])
    g = torch.Generator().manual_seed(5)
    calls = [((torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.tensor(1.0 + s)), {})
             for s in range(6)]  # the embedding changes too: only their sum makes reuse track it
    with warnings.catch_warnings():
        warnings.simplefilter("error", BccWarning)  # no longer "cannot tell"
        _check_against_reference(WithSharedSkip(), schedule, calls,
                                 {"blk": lambda args, kwargs: [args[0] + args[1]]})


def _flux_with_equal_token_counts(latent=8):
    """A tiny FluxTransformer2DModel whose 64 text tokens match its 8x8 = 64 image tokens,
    so both streams of every block have one shape; inputs for a few steps."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 4, 8),
    ).eval()
    tokens, batch = latent * latent, 2
    g = torch.Generator().manual_seed(1)
    text, pooled = torch.randn(batch, tokens, 24, generator=g), torch.randn(batch, 12, generator=g)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(latent).float(), torch.arange(latent).float(), indexing="ij")
    img_ids = torch.stack(grid, -1).reshape(-1, 3)

    def calls(num_steps):
        return [((torch.randn(batch, tokens, 8, generator=torch.Generator().manual_seed(10 + s)),),
                 dict(encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((batch,), 1 - s / 10),
                      img_ids=img_ids, txt_ids=torch.zeros(tokens, 3), return_dict=False))
                for s in range(num_steps)]
    return model, calls


def _flux_streams(args, kwargs):
    # Every Flux block, double or single, returns (text stream, image stream).
    return [kwargs["encoder_hidden_states"], kwargs["hidden_states"]]


def test_flux_with_as_many_text_as_image_tokens_pairs_each_stream_with_its_own_input():
    model, calls = _flux_with_equal_token_counts()
    names = bcc.find_blocks(model, calls(1)[0])
    assert names[-1] == "single_transformer_blocks.1"
    mask = _random_mask(4, 4, len(names))
    mask[1:, -1] = torch.tensor([False, True, False])  # the last single block is reused
    schedule = Schedule(mask, names)
    want = _check_against_reference(model, schedule, calls(4), {n: _flux_streams for n in names})
    # The pairing the old shape rules made (the image output as a residual of the text
    # input) gives another result: the check above would have caught it.
    swapped = {n: _flux_streams for n in names}
    swapped[names[-1]] = lambda a, k: [k["hidden_states"], k["encoder_hidden_states"]]
    wrong = _flat(_with(StreamReference, model, schedule, calls(4), swapped))
    assert max(float((w - x).abs().max()) for w, x in zip(wrong, want)) > 1e-3


# -- fuzz: random blocks with several same-shaped inputs ------------------------------------------
STREAM_FORMS = [
    lambda x, m: x + torch.tanh(m),
    lambda x, m: torch.tanh(m) * 0.5 + x,
    lambda x, m: x - torch.sigmoid(m),
    lambda x, m: (x + torch.tanh(m)) / 1.0,
    lambda x, m: (x.reshape(x.shape[0], -1) + torch.tanh(m).reshape(x.shape[0], -1)).reshape(x.shape),
]
NO_STREAM_FORMS = [
    lambda x, m: 2 * x + torch.tanh(m),
    lambda x, m: torch.tanh(x + m),
    lambda x, m: torch.tanh(m) - x,
]


class FuzzBlock(nn.Module):
    """Outputs from a drawn plan: ``("add", [(stream or None, k, m, form)...])`` or
    ``("cat", a, b, how, order)`` (Flux-like: cat two inputs, process, split again)."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def forward(self, *xs):
        if self.plan[0] == "add":
            outs = []
            for stream, k, m, form in self.plan[1]:
                if stream is None:
                    outs.append(NO_STREAM_FORMS[form % len(NO_STREAM_FORMS)](xs[k], xs[m]))
                else:
                    outs.append(STREAM_FORMS[form % len(STREAM_FORMS)](xs[stream], xs[m]))
            return tuple(outs)
        _, a, b, how, order = self.plan
        n = xs[a].shape[1]
        h = torch.cat([xs[a], xs[b]], dim=1)
        h = h + torch.tanh(h.mean(1, keepdim=True)) * h.sigmoid()
        pieces = {"slice": lambda: (h[:, :n], h[:, n:]), "split": lambda: tuple(h.split([n, n], dim=1)),
                  "chunk": lambda: tuple(h.chunk(2, dim=1))}[how]()
        return tuple(pieces[i] for i in order)

    def streams(self):
        if self.plan[0] == "add":
            return [stream for stream, *_ in self.plan[1]]
        _, a, b, _, order = self.plan
        return [(a, b)[i] for i in order]


@st.composite
def _plans(draw):
    n_in = draw(st.integers(2, 4))
    if draw(st.booleans()):
        a, b = draw(st.permutations(range(n_in)))[:2]
        return n_in, ("cat", a, b, draw(st.sampled_from(["slice", "split", "chunk"])),
                      draw(st.sampled_from([(0, 1), (1, 0)])))
    index = st.integers(0, n_in - 1)
    outs = draw(st.lists(st.tuples(st.one_of(st.none(), index), index, index, st.integers(0, 4)),
                         min_size=1, max_size=3))
    return n_in, ("add", outs)


class FuzzNet(nn.Module):
    def __init__(self, plan, use_all):
        super().__init__()
        self.blk, self.use_all = FuzzBlock(plan), use_all

    def forward(self, *xs):
        *xs, t = xs
        outs = self.blk(*xs)
        # Not using every output is Flux's last single block: the graph drops the unused one.
        return tuple(o * t for o in outs) if self.use_all else outs[-1] * t


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(drawn=_plans(), use_all=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_rewrite_and_hooks_equal_an_independent_reference(drawn, use_all, seed):
    n_in, plan = drawn
    model = FuzzNet(plan, use_all)
    streams = model.blk.streams()
    num_steps = 4
    g = torch.Generator().manual_seed(seed)
    calls = [(tuple(torch.randn(SHAPE, generator=g) for _ in range(n_in)) + (torch.tensor(1.0 + s),), {})
             for s in range(num_steps)]
    schedule = Schedule(_random_mask(seed, num_steps, 1), ["blk"])
    bases = {"blk": lambda args, kwargs: [None if k is None else args[k] for k in streams]}
    want = _with(StreamReference, model, schedule, calls, bases)
    hooked = _with(HookReference, model, schedule, calls)
    with torch.no_grad():
        fast = bcc.compile(model, schedule, backend="eager")
        got = [fast(*a, **k) for a, k in calls]
    for w, h, r in zip(want, hooked, got):
        for a, b, c in zip(*(x if isinstance(x, tuple) else (x,) for x in (w, h, r))):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
            torch.testing.assert_close(c, a, rtol=0, atol=0)


# -- calibration measures the same quantity --------------------------------------------------------
def test_calibrate_measures_the_residual_of_the_identity_stream():
    calls = _crafted_calls(4)

    def sample(model, cond, seed):
        for a, _ in calls:
            model(*a)

    profile = bcc.calibrate(Crafted(), sample, [0], seeds=[0], blocks=["blk"], progress=False)
    # By hand: MeanShift's residual against its stream b is 2 * mean(a), broadcast like b.
    residuals = [(2 * a.mean(-1, keepdim=True)).expand(SHAPE) for (a, _b, _t), _ in calls]
    want = [0.0] + [float((r - p).abs().sum() / r.abs().sum()) for p, r in zip(residuals, residuals[1:])]
    assert profile.l1_rel[:, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert list(profile.timesteps) == [1.0, 2.0, 3.0, 4.0]  # found by its name, t
