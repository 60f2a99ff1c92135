"""Analytic toy models: reuse and recompute give different, exactly known values."""
import torch
from torch import nn


class Double(nn.Module):
    """out = 2x, so the residual is x itself."""

    def forward(self, x):
        return x * 2


class AddTen(nn.Module):
    """out = x + 10 (+ ctx mean when given): residual 10, shape-preserving."""

    def forward(self, x, ctx=None):
        return x + 10 if ctx is None else x + 10 + ctx.mean()


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


class ToyWiden(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = Widen()

    def forward(self, x, t):
        return self.b0(x).sum(-1, keepdim=True) + t


class TwoOut(nn.Module):
    """A Flux-like block returning two streams; its residuals pair by shape."""

    def forward(self, a, b):
        return b * 3, a + 1


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
