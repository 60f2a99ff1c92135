"""capture: a trace leaves the user's model as it found it, and an eager program runs with
autograd on.

Non-strict torch.export runs the model's Python on fake tensors, so a cache the model fills
at its first call (Z-Image's rotary table on a plain helper object) would keep fake tensors:
later captures fail and, worse, the user's own model computes wrong values. Checked against
an untouched deep copy of the model (the reference), on a toy and on a tiny Z-Image.
"""
import copy

import pytest
import torch
import torch.utils._pytree as pytree

import bcc
from testing import Attending


class _LazyTable:
    """Like diffusers' RopeEmbedder: a plain object that fills a table at its first call."""

    def __init__(self):
        self.table = None
        self.calls = []

    def __call__(self, n):
        if self.table is None:
            self.table = torch.arange(8.0).reshape(2, 4) / 7
        self.calls.append(n)
        return self.table[:, :n]


class _Lazy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rope = _LazyTable()
        self.seen = {}
        self.pad = torch.nn.Parameter(torch.randn(4))  # outside the blocks, feeds them
        self.blocks = torch.nn.ModuleList([Attending(), Attending()])

    def forward(self, x, t):
        if not hasattr(self, "scale"):
            self.register_buffer("scale", torch.full((4,), 0.5))  # registered at the first call
        self.seen[x.shape[0]] = x.shape
        x = x + self.pad + self.rope(4).sum(0) * self.scale
        for b in self.blocks:
            x = b(x)
        return x * t


def _leaves(out):
    return [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]


def _calls(batch, steps=3):
    g = torch.Generator().manual_seed(batch)
    return [((torch.randn(batch, 3, 4, generator=g), torch.tensor(1.0 - 0.25 * s)), {}) for s in range(steps)]


@pytest.mark.parametrize("grad", [False, True])
def test_a_cold_model_is_left_as_it_was_and_captures_again(grad):
    torch.manual_seed(0)
    model = _Lazy().eval()
    untouched = copy.deepcopy(model)
    names = bcc.find_blocks(model, _calls(2)[0])  # one capture before any plain call
    assert names == ["blocks.0", "blocks.1"]
    assert model.rope.table is None and model.rope.calls == [] and model.seen == {} and not hasattr(model, "scale")
    fast = bcc.compile(model, bcc.Schedule.every(2, 3, names), backend="eager")
    with torch.set_grad_enabled(grad):
        for batch in (2, 1):  # a second input signature: a second capture
            for args, kwargs in _calls(batch):
                fast(*args, **kwargs)
    assert fast.bcc_stats()["signatures"] == 2
    with torch.no_grad():
        for batch in (2, 1):
            for args, kwargs in _calls(batch):
                for got, want in zip(_leaves(model(*args, **kwargs)), _leaves(untouched(*args, **kwargs))):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_cold_z_image_is_left_as_it_was():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]).eval()
    untouched = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    caps = [torch.randn(6, 32, generator=g), torch.randn(4, 32, generator=g)]

    def call(step, batch=2):
        x = torch.randn(batch, 4, 1, 8, 8, generator=torch.Generator().manual_seed(step))
        return (list(x.unbind(0)), torch.full((batch,), 0.2 * step), caps[:batch]), {"return_dict": False}

    fast = bcc.compile(model, lambda names: bcc.Schedule.every(2, 3, names), blocks="layers.*", backend="eager")
    with torch.no_grad():
        for batch in (2, 1):
            outs = [fast(*call(s, batch)[0], **call(s, batch)[1]) for s in range(3)]
            assert all(torch.isfinite(v).all() for o in outs for v in _leaves(o))
        assert model.rope_embedder.freqs_cis is None  # the capture filled nothing
        for s in range(3):
            for got, want in zip(_leaves(model(*call(s)[0], **call(s)[1])), _leaves(untouched(*call(s)[0], **call(s)[1]))):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
