"""Block discovery: the default attention set, selectors, and region checks."""
import pytest
import torch
import torch.fx as fx

import bcc
from bcc import BccError, ErrorCode
from bcc.analyze.blocks import find_block_regions

from testing import Toy, Twice, built

UNET_TINY_BLOCKS = [
    "down_blocks.0.attentions.0",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
]


def _find(name, **kw):
    model, args, kwargs = built(name)
    return bcc.find_blocks(model, (args, kwargs), **kw)


def test_unet_default_is_each_spatial_transformer_in_order():
    assert _find("unet-tiny") == UNET_TINY_BLOCKS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pixart", ["transformer_blocks.0", "transformer_blocks.1"]),
        ("dit", ["transformer_blocks.0", "transformer_blocks.1"]),
        ("sd3", ["transformer_blocks.0", "transformer_blocks.1"]),
        ("flux", ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                  "single_transformer_blocks.1"]),
    ],
)
def test_dit_default_is_each_layer_block(name, expected):
    assert _find(name) == expected


def test_glob_selects_resnets():
    assert _find("unet-tiny", blocks="*.resnets.*") == [
        "down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.resnets.0", "mid_block.resnets.1",
        "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
    ]


def test_class_selector_and_outermost_wins():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    assert _find("unet-tiny", blocks=Transformer2DModel) == UNET_TINY_BLOCKS
    # A whole down block (DeepCache-style granularity) contains its attention: outermost wins.
    assert _find("unet-tiny", blocks=[CrossAttnDownBlock2D, "*.attentions.*"]) == [
        "down_blocks.0", *UNET_TINY_BLOCKS[1:]
    ]


def test_predicate_selector():
    assert _find("unet-tiny", blocks=lambda path, cls: path == "mid_block.attentions.0") == [
        "mid_block.attentions.0"
    ]


def test_no_match_is_an_error_listing_paths():
    with pytest.raises(BccError) as e:
        _find("unet-tiny", blocks="nope.*")
    assert e.value.code is ErrorCode.NO_BLOCKS
    assert "'down_blocks" in str(e.value) and "blocks=" in str(e.value)


def test_module_called_twice_is_an_error():
    with pytest.raises(BccError) as e:
        bcc.find_blocks(Twice(), ((torch.ones(2), torch.tensor(1.0)), {}), blocks="b0")
    assert e.value.code is ErrorCode.BLOCK_MULTI_CALL


def _hand_graph():
    # x -> a1 (block "blk") -> out (outside) -> a2 (block "blk") -> y: the block's value
    # leaves it and comes back, so it cannot be skipped as one unit.
    g = fx.Graph()
    x = g.placeholder("x")
    a1 = g.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    out = g.call_function(torch.ops.aten.add.Tensor, (a1, 1))
    a2 = g.call_function(torch.ops.aten.mul.Tensor, (out, 3))
    g.output((a2,))
    for n in (a1, a2):
        n.meta["nn_module_stack"] = {"L__self__blk": ("blk", "toys.Blk")}
    out.meta["nn_module_stack"] = {"L__self__other": ("other", "toys.Other")}
    return fx.GraphModule(torch.nn.Module(), g)


def test_non_convex_region_is_an_error_naming_the_node():
    with pytest.raises(BccError) as e:
        find_block_regions(_hand_graph(), "blk")
    assert e.value.code is ErrorCode.BLOCK_NOT_REGION
    assert "'blk'" in str(e.value) and "add" in str(e.value)


def test_regions_include_private_parameters():
    model, args, kwargs = built("unet-tiny")
    from bcc.capture.graph import capture

    blocks = find_block_regions(capture(model, args, kwargs).gm)
    attrs = [n for n in blocks[0].nodes if n.op == "get_attr"]
    assert attrs and all(str(n.target).startswith("down_blocks.0.attentions.0.") for n in attrs)


def test_toy_blocks():
    assert bcc.find_blocks(Toy(), ((torch.ones(2), torch.tensor(1.0)), {}), blocks="b*") == ["b0", "b1"]
