"""The issue-18 root causes, each on an analytic toy: pass-through block outputs, cond
operand strides under inductor, 0-d constants and dynamic slices at capture, the latent
rule of default discovery, and Schedule equality."""
from __future__ import annotations

import torch

import bcc
from bcc.capture.graph import LATENT, capture
from bcc.capture.normalize import normalize
from bcc.passes import AnnotateBlocksPass, OutlineBlocksPass

aten = torch.ops.aten


class Block0(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x, temb):
        return x + self.lin(x) * temb.float()


class Wanish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = Block0(torch.nn.Linear(4, 4))
        self.b1 = torch.nn.Linear(4, 4)

    def forward(self, x, temb):
        temb = temb.float()
        h = self.b0(x, temb)
        return h + self.b1(h) * temb


def _inputs(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)


def test_a_pass_through_of_a_block_input_is_not_a_block_output():
    gm = capture(Wanish(), _inputs(0)).gm
    gm = OutlineBlocksPass()(AnnotateBlocksPass(names=["b0", "b1"])(gm).graph_module).graph_module
    block0 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "bcc_block_0")
    outs = gm.get_submodule("bcc_block_0").graph.output_node().args[0]
    assert len(outs) == 1, "block 0's only output is its hidden state, not the timestep it passes through"
    readers = {u.name for u in gm.graph.nodes if block0 in u.all_input_nodes}
    assert readers == {"getitem"}


def test_a_pass_through_reused_in_output_mode_still_feeds_this_steps_conditioning():
    model = Wanish()
    schedule = bcc.Schedule(torch.tensor([[True, True], [False, True]]), ("b0", "b1"))
    fast = bcc.compile(model, schedule, mode="output", backend="eager")
    with torch.no_grad():
        x0, t0 = _inputs(0)
        x1, t1 = _inputs(1)
        fast(x0, t0)
        got = fast(x1, t1)
        h0 = model.b0(x0, t0)  # reused whole at step 1
        want = h0 + model.b1(h0) * t1  # block 1 recomputes with step 1's temb
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class PatchTokens(torch.nn.Module):
    """Like every video DiT: patch tokens ``conv(x).flatten(2).transpose(1, 2)`` enter the first block."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 2, stride=2)
        self.block = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)

    def forward(self, x, t):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.block(tokens) * t


def test_a_transposed_cond_operand_keeps_its_strides_under_inductor():
    model = PatchTokens().eval()
    schedule = bcc.Schedule.every(2, 3, ["block"])
    fast = bcc.compile(model, schedule)
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(2, 3, 8, 8, generator=g), torch.tensor(1.0 - 0.1 * s)) for s in range(3)]
    with torch.no_grad():
        got = [fast(*c) for c in calls]
        ref = bcc.compile(model, schedule, backend="eager")
        want = [ref(*c) for c in calls]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capture_folds_a_scalar_constant_into_full():
    gm = capture(torch.nn.Identity(), (torch.ones(2),)).gm
    gm.register_buffer("lifted", torch.tensor(True))
    node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(node):
        const = gm.graph.get_attr("lifted")
    with gm.graph.inserting_after(const):
        copy = gm.graph.call_function(aten.lift_fresh_copy.default, (const,))
    with gm.graph.inserting_after(copy):
        out = gm.graph.call_function(aten.mul.Tensor, (node, copy))
    gm.graph.output_node().args = ((out,),)
    gm.recompile()
    normalize(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.lift_fresh_copy.default not in targets and aten.full.default in targets
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    torch.testing.assert_close(gm(torch.tensor([2.0, 3.0]))[0], torch.tensor([2.0, 3.0]))


def test_capture_spells_out_a_slice_bound_next_to_a_data_dependent_one():
    class Unpatchify(torch.nn.Module):
        def forward(self, x, sizes):
            h, w = sizes.tolist()
            return x[:, : h * w] * 2

    c = capture(Unpatchify(), (torch.randn(2, 9, 4), torch.tensor([2, 3])))
    slices = [n for n in c.gm.graph.nodes if n.target is aten.slice.Tensor]
    assert slices and all(n.args[2] == 0 for n in slices)
    x = torch.randn(2, 9, 4)
    torch.testing.assert_close(c.gm(x, torch.tensor([2, 3]))[0], x[:, :6] * 2)


class Pooler(torch.nn.Module):
    """A caption pooler: attention over the text only (Mochi's time_embed, HunyuanVideo's refiner)."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, text):
        return self.attn(text, text, text, need_weights=False)[0].mean(1)


class TextConditioned(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = Pooler()
        self.block = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)

    def forward(self, hidden_states, text):
        return self.block(hidden_states + self.pool(text)[:, None])


def test_default_blocks_read_the_latent_and_skip_conditioning_modules():
    model = TextConditioned().eval()
    call = ((torch.randn(2, 5, 8), torch.randn(2, 3, 8)), {})
    assert bcc.find_blocks(model, call) == ["block"]
    assert bcc.find_blocks(model, call, blocks=["pool", "block"]) == ["pool", "block"]  # asked for: allowed
    assert capture(model, *call).gm.meta[LATENT] == ("hidden_states",)


def test_default_blocks_find_the_latent_when_it_is_passed_by_keyword():
    model = TextConditioned().eval()
    call = ((), {"text": torch.randn(2, 3, 8), "hidden_states": torch.randn(2, 5, 8)})
    assert bcc.find_blocks(model, call) == ["block"]


def test_schedules_compare_by_value():
    a = bcc.Schedule.every(2, 4, ["x", "y"])
    b = bcc.Schedule.every(2, 4, ["x", "y"])
    assert a == b and hash(a) == hash(b)
    assert a != bcc.Schedule.every(3, 4, ["x", "y"]) and a != bcc.Schedule.every(2, 4, ["x", "z"])
    assert a != bcc.Schedule.every(2, 5, ["x", "y"])


def test_two_backend_compiles_with_schedules_in_one_process():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Linear(2, 2)

        def forward(self, x):
            return x + self.block(x)

    x = torch.ones(1, 2)
    for n in (2, 3):
        net = Net()
        fast = torch.compile(net, backend="bcc", dynamic=False, options={
            "schedule": bcc.Schedule.every(n, 3, ["block"]), "backend": "eager"})
        torch.testing.assert_close(fast(x), net(x))


def test_an_inductor_without_the_cond_hooks_gets_the_pointwise_cat_fallback(monkeypatch):
    # An inductor whose cond lowering has another shape (no classmethod to wrap): the
    # correction stays out, the pointwise cat comes in, and a compiled schedule still equals the eager rewrite.
    from torch._inductor import ir

    from bcc.lower.inductor_fixes import inductor_settings

    create = ir.Conditional.create  # bound to the class; a plain function wraps it below
    monkeypatch.setattr(ir.Conditional, "create", staticmethod(lambda *a, **k: create(*a, **k)))
    with inductor_settings({"layout_optimization": False}) as opts:
        assert opts == {"force_pointwise_cat": True, "layout_optimization": False}
    model = Wanish().eval()
    schedule = bcc.Schedule.every(2, 3, ["b0", "b1"])
    calls = [_inputs(s) for s in range(3)]
    with torch.no_grad():
        fast = bcc.compile(model, schedule)
        got = [fast(*c) for c in calls]
        ref = bcc.compile(model, schedule, backend="eager")
        want = [ref(*c) for c in calls]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
