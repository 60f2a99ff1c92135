"""Shared test helpers, the one module tests import them from: zoo models and their
trajectories, analytic toy models, a tiny offline diffusers pipeline, schedules, and
the outputs of bcc's hook reference (independent references live in the tests that
need them)."""
import json
import os
import tempfile

import torch
from hypothesis import strategies as st
from torch import nn

from bcc import Schedule
from bcc.runtime.reference import HookReference
from bcc.tools import zoo


# -- zoo models ---------------------------------------------------------------------
_BUILT: dict = {}


def built(name: str, latent: int = 8, batch: int = 2):
    """Session-cached zoo model (weights never change, so sharing is safe)."""
    key = (name, latent, batch)
    if key not in _BUILT:
        _BUILT[key] = zoo.build(name, latent=latent, batch=batch)
    return _BUILT[key]


def trajectory_inputs(name: str, model, num_steps: int, *, latent: int = 8, batch: int = 2, seed: int = 0):
    extra = zoo.spec_of(model).extra
    return [zoo.step_inputs(name, model, extra, latent=latent, batch=batch, step=s, seed=seed, num_steps=num_steps)
            for s in range(num_steps)]


def first_tensor(out):
    return torch.utils._pytree.tree_leaves(out)[0]


def run(model, inputs):
    with torch.no_grad():
        return [first_tensor(model(*a, **k)) for a, k in inputs]


def reference_outputs(model, schedule, inputs, mode="residual", scale_shift=None):
    ref = HookReference(model, schedule, mode=mode, scale_shift=scale_shift)
    try:
        return run(model, inputs)
    finally:
        ref.remove()


# -- schedules ---------------------------------------------------------------------------
def random_schedule(data, names, num_steps):
    bits = data.draw(st.lists(st.booleans(), min_size=num_steps * len(names), max_size=num_steps * len(names)))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(num_steps, len(names))
    mask[0] = True
    return Schedule(mask, names)


def changing_schedule(num_steps, names):
    # A different recompute pattern at every step (row s: blocks whose bit s is set).
    mask = torch.zeros(num_steps, len(names), dtype=torch.bool)
    for s in range(num_steps):
        for i in range(len(names)):
            mask[s, i] = bool((s * 7 + i * 3) % 5 < 2)
    mask[0] = True
    assert len({tuple(r) for r in mask.tolist()}) >= 5
    return Schedule(mask, names)


# -- analytic toy models (reuse and recompute give different, exactly known values) --------
class Double(nn.Module):
    """out = 2x: no identity path (the coefficient of x is 2, not 1), so it is cached whole."""

    def forward(self, x):
        return x * 2


class Skip(nn.Module):
    """out = x + |x|: x is the residual stream, the residual |x| depends on it."""

    def forward(self, x):
        return x + x.abs()


class AddTen(nn.Module):
    """out = x + 10 (+ ctx mean when given): residual 10, shape-preserving."""

    def forward(self, x, ctx=None):
        return x + 10 if ctx is None else x + 10 + ctx.mean()


class Attending(nn.Module):
    """x + self-attention(x) over 4 channels: what the default selector takes for a block."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x)[0]


class Widen(nn.Module):
    """Output shaped unlike the input: always cached whole."""

    def forward(self, x):
        return torch.cat([x, x * 3], dim=-1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = Double()
        self.b1 = AddTen()

    def forward(self, x, t):
        h = self.b0(x)
        h = self.b1(h)
        return h + t


class ToySkip(nn.Module):
    """Toy with a b0 that has a skip connection: residual reuse differs from recompute."""

    def __init__(self):
        super().__init__()
        self.b0 = Skip()
        self.b1 = AddTen()

    def forward(self, x, t):
        return self.b1(self.b0(x)) + t


class ToyWiden(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = Widen()

    def forward(self, x, t):
        return self.b0(x).sum(-1, keepdim=True) + t


class TwoOut(nn.Module):
    """A Flux-like block returning two streams: output 0 is ``b``'s (residual 2|b|),
    output 1 is ``a``'s (residual 1), whatever their shapes."""

    def forward(self, a, b):
        return b + 2 * b.abs(), a + 1


class ToyTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = TwoOut()

    def forward(self, x, ctx, t):
        c, h = self.pair(x, ctx)
        return h * t, c


class Twice(nn.Module):
    """Calls the same module twice: not cacheable as one region per step."""

    def __init__(self):
        super().__init__()
        self.b0 = Double()

    def forward(self, x, t):
        return self.b0(self.b0(x) + t)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Identity()
        self.b = nn.Identity()

    def forward(self, x, outside):
        return self.b(outside(self.a(x) * 2)) + 1


class Leaky(nn.Module):
    """Block `blk` hands a value to a module outside it and takes it back: not convex."""

    def __init__(self):
        super().__init__()
        self.blk = Inner()
        self.helper = nn.Linear(3, 3)

    def forward(self, x, t):
        return self.blk(x, self.helper) + t


# -- a StableDiffusionPipeline assembled offline from tiny random components ----------
def _byte_chars():
    # GPT-2/CLIP byte-to-unicode table: every byte maps to a printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = tempfile.mkdtemp(prefix="bcc_tok_")
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=16)


def tiny_sd_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
