"""Golden graphs and node counts for each pass."""
import operator

import pytest
import torch

import bcc
from bcc import Schedule
from bcc.capture.graph import capture
from bcc.passes import AnnotateBlocksPass, GateBlocksPass, OutlineBlocksPass

from testing import Toy, built

COND = torch.ops.higher_order.cond


def _toy_gm():
    return capture(Toy(), (torch.ones(2, 3), torch.tensor(1.0))).gm


def _code(gm):
    return "\n".join(line.rstrip() for line in gm.code.strip("\n").splitlines() if line.strip())


def test_annotate_tags_nodes_and_orders_blocks():
    res = AnnotateBlocksPass(selector="b*")(_toy_gm())
    gm = res.graph_module
    assert res.modified
    assert gm.meta["bcc_blocks"] == ["b0", "b1"]
    tags = [(n.name, n.meta.get("bcc_block")) for n in gm.graph.nodes]
    assert tags == [("x", None), ("t", None), ("mul", "b0"), ("add", "b1"), ("add_1", None), ("output", None)]


def test_outline_golden_graph():
    gm = AnnotateBlocksPass(names=["b0", "b1"])(_toy_gm()).graph_module
    gm = OutlineBlocksPass()(gm).graph_module
    assert _code(gm) == """def forward(self, x, t):
    bcc_block_0 = self.bcc_block_0(x);  x = None
    getitem = bcc_block_0[0];  bcc_block_0 = None
    bcc_block_1 = self.bcc_block_1(getitem);  getitem = None
    getitem_1 = bcc_block_1[0];  bcc_block_1 = None
    add_1 = torch.ops.aten.add.Tensor(getitem_1, t);  getitem_1 = t = None
    return (add_1,)"""
    assert _code(gm.bcc_block_1) == """def forward(self, getitem):
    add = torch.ops.aten.add.Tensor(getitem, 10);  getitem = None
    return (add,)"""


def test_gate_golden_graph():
    gm = _toy_gm()
    for p in (AnnotateBlocksPass(names=["b0", "b1"]), OutlineBlocksPass(), GateBlocksPass()):
        gm = p(gm).graph_module
    assert _code(gm) == """def forward(self, bcc_schedule, bcc_step, bcc_cache_0_0, bcc_cache_1_0, x, t):
    reshape_default = torch.ops.aten.reshape.default(bcc_step, [1]);  bcc_step = None
    index_select_default = torch.ops.aten.index_select.default(bcc_schedule, 0, reshape_default);  bcc_schedule = reshape_default = None
    select_int = torch.ops.aten.select.int(index_select_default, 0, 0);  index_select_default = None
    contiguous_default = torch.ops.aten.contiguous.default(x);  x = None
    select_int_1 = torch.ops.aten.select.int(select_int, 0, 0)
    bcc_recompute_0 = self.bcc_recompute_0
    bcc_reuse_0 = self.bcc_reuse_0
    cond = torch.ops.higher_order.cond(select_int_1, bcc_recompute_0, bcc_reuse_0, (bcc_cache_0_0, contiguous_default));  select_int_1 = bcc_recompute_0 = bcc_reuse_0 = bcc_cache_0_0 = contiguous_default = None
    getitem_2 = cond[0];  cond = None
    contiguous_default_1 = torch.ops.aten.contiguous.default(getitem_2)
    select_int_2 = torch.ops.aten.select.int(select_int, 0, 1);  select_int = None
    bcc_recompute_1 = self.bcc_recompute_1
    bcc_reuse_1 = self.bcc_reuse_1
    cond_1 = torch.ops.higher_order.cond(select_int_2, bcc_recompute_1, bcc_reuse_1, (bcc_cache_1_0, contiguous_default_1));  select_int_2 = bcc_recompute_1 = bcc_reuse_1 = bcc_cache_1_0 = contiguous_default_1 = None
    getitem_3 = cond_1[0]
    getitem_4 = cond_1[1];  cond_1 = None
    add_1 = torch.ops.aten.add.Tensor(getitem_3, t);  getitem_3 = t = None
    return (add_1, getitem_2, getitem_4)"""
    # b0 (2x) has no identity path, so its whole output is cached: its branches return the
    # output alone, which is also the new cache (getitem_2); b1 (x + 10) is a residual block.
    assert _code(gm.bcc_reuse_0) == """def forward(self, cache_0, x_0):
    clone_default = torch.ops.aten.clone.default(cache_0);  cache_0 = None
    return (clone_default,)"""
    assert _code(gm.bcc_recompute_0) == """def forward(self, cache_0, x_0):
    block = self.block(x_0);  x_0 = None
    getitem = block[0];  block = None
    contiguous_default = torch.ops.aten.contiguous.default(getitem);  getitem = None
    return (contiguous_default,)"""
    assert _code(gm.bcc_reuse_1) == """def forward(self, cache_0, x_0):
    add_tensor = torch.ops.aten.add.Tensor(x_0, cache_0);  x_0 = None
    contiguous_default = torch.ops.aten.contiguous.default(add_tensor);  add_tensor = None
    clone_default = torch.ops.aten.clone.default(cache_0);  cache_0 = None
    return (contiguous_default, clone_default)"""
    assert _code(gm.bcc_recompute_1) == """def forward(self, cache_0, x_0):
    block = self.block(x_0)
    getitem = block[0];  block = None
    contiguous_default = torch.ops.aten.contiguous.default(getitem);  getitem = None
    sub_tensor = torch.ops.aten.sub.Tensor(contiguous_default, x_0);  x_0 = None
    return (contiguous_default, sub_tensor)"""
    slots = gm.meta["bcc_cache_slots"]
    assert [(s.block, s.output, s.base, s.shape) for s in slots] == [("b0", 0, None, (2, 3)), ("b1", 0, 0, (2, 3))]


def test_gate_output_mode_has_no_residual_arithmetic():
    gm = _toy_gm()
    for p in (AnnotateBlocksPass(names=["b0"]), OutlineBlocksPass(), GateBlocksPass(mode="output")):
        gm = p(gm).graph_module
    ops = [n.target for n in gm.bcc_reuse_0.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.aten.clone.default]  # the output, which is also the new cache
    assert gm.meta["bcc_cache_slots"][0].base is None


def test_unet_counts_one_cond_per_block_and_keeps_other_nodes():
    model, args, kwargs = built("unet-tiny")
    gm = capture(model, args, kwargs).gm
    n_conv_before = sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    gm = AnnotateBlocksPass()(gm).graph_module
    gm = OutlineBlocksPass()(gm).graph_module
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 4
    gm = GateBlocksPass()(gm).graph_module
    assert sum(n.target is COND for n in gm.graph.nodes) == 4
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 0
    inner = sum(
        1 for i in range(4) for n in gm.get_submodule(f"bcc_recompute_{i}.block").graph.nodes
        if n.target is torch.ops.aten.conv2d.default
    )
    outer = sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert inner + outer == n_conv_before  # every conv is either gated or still runs
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    slots = gm.meta["bcc_cache_slots"]
    # A getitem per block output, and one per residual cache: a cache held whole is the
    # main graph's copy of the output.
    assert len(slots) == 4
    assert len(getitems) == len(slots) + sum(s.base is not None for s in slots)


class _LastBlock(torch.nn.Module):
    """The model returns a block cached whole, so the caller holds the tensor the cache would be."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.head(x * 2)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_caller_changing_the_output_in_place_leaves_the_cache_alone(backend):
    model = _LastBlock()
    schedule = Schedule(torch.tensor([[True], [False], [False]]), ["head"])
    fast = bcc.compile(model, schedule, backend=backend, mode="output")
    x = torch.randn(2, 3)
    with torch.no_grad():
        want = model(x)
        first = fast(x)
        first.mul_(0)  # what a sampler may do with a prediction it owns
        second = fast(torch.randn(2, 3))
        second.add_(1)
        third = fast(torch.randn(2, 3))
    torch.testing.assert_close(third, want, rtol=1e-6, atol=1e-6)
