"""The cost model is honest: predicted compute fraction = FLOPs the rewritten graph runs."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bcc
from bcc.plan.calibrate import block_flops

from testing import built, trajectory_inputs


def _flops(model, inputs):
    # The math SDPA kernel, as in block_flops: the counter cannot see the fused CPU kernel.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for a, k in inputs:
            model(*a, **k)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["unet-tiny", "pixart"])
def test_predicted_fraction_equals_executed_flops(name):
    steps = 8
    model, args, kwargs = built(name)
    names = bcc.find_blocks(model, (args, kwargs))
    costs, rest = block_flops(model, args, kwargs, names)
    g = torch.Generator().manual_seed(3)
    l1 = torch.rand(steps, len(names), generator=g, dtype=torch.float64)
    l1[0] = 0
    profile = bcc.ChangeProfile(l1, names, block_flops=costs, rest_flops=rest)
    schedule = bcc.Schedule.for_budget(profile, 0.9)
    assert schedule.compute_fraction() < 1.0
    inputs = trajectory_inputs(name, model, steps)
    full = _flops(model, inputs)
    # FlopCounterMode counts a torch.cond as the larger of its branches (a static upper
    # bound); strategy="specialize" runs each step's graph with the taken branches inlined,
    # so the counter sees exactly what runs.
    fast = bcc.compile(model, schedule, backend="eager", strategy="specialize")
    _flops(fast, inputs)  # the first trajectory also captures (export traces the model once)
    executed = _flops(fast, inputs)
    assert executed / full == pytest.approx(schedule.compute_fraction(), rel=1e-9)


def test_attention_is_counted():
    # The fused CPU attention kernel has no FLOP formula; block_flops must not rate it free.
    model, args, kwargs = built("pixart")
    names = bcc.find_blocks(model, (args, kwargs))
    costs, _ = block_flops(model, args, kwargs, names)
    with FlopCounterMode(display=False) as without:
        with torch.no_grad():
            model(*args, **kwargs)
    linear = sum(sum(d.values()) for k, d in without.get_flop_counts().items() if k.endswith("." + names[0]))
    assert costs[0] > linear > 0
