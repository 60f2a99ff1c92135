"""bcc.tools.plot: change curves (Fig. 2b) and cache lifetimes (Fig. 4) for 4 to 60 blocks."""
import os

import pytest
import torch
from PIL import Image

from bcc import ChangeProfile, Schedule
from bcc.tools.plot import MAX_LINES_PER_AXES, lifetimes, plot_change, plot_schedule

COUNTS = (4, 16, 60)


def synthetic_profile(num_blocks: int, num_steps: int = 20, *, std: bool = True) -> ChangeProfile:
    g = torch.Generator().manual_seed(num_blocks)
    pos = torch.linspace(0, 1, num_blocks, dtype=torch.float64)
    s = torch.arange(num_steps, dtype=torch.float64)[:, None]
    l1 = (0.05 + 0.4 * torch.exp(-s / (3 + 5 * pos)) + 0.1 * pos * s / num_steps)
    l1 = l1 * (1 + 0.1 * torch.rand(num_steps, num_blocks, generator=g, dtype=torch.float64))
    l1[0] = 0
    names = [f"transformer_blocks.{i}" for i in range(num_blocks)]
    return ChangeProfile(l1, names, l1_std=0.2 * l1 if std else None, block_flops=[1.0 + i % 3 for i in range(num_blocks)],
                         rest_flops=float(num_blocks), num_runs=4)


def _size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    sizes = {}
    for k in COUNTS:
        p = synthetic_profile(k)
        c = plot_change(p, out / f"change{k}.png")
        s = plot_schedule(Schedule.for_budget(p, 0.6), out / f"schedule{k}.png")
        assert c == out / f"change{k}.png" and s == out / f"schedule{k}.png"
        sizes[k] = (_size(c), _size(s), c.stat().st_size, s.stat().st_size)
    return out, sizes


@pytest.mark.parametrize("k", COUNTS)
def test_both_plots_written(written, k):
    out, sizes = written
    change_px, schedule_px, change_bytes, schedule_bytes = sizes[k]
    assert change_bytes > 10_000 and schedule_bytes > 5_000  # real drawings, not blank canvases
    assert min(change_px) >= 300 and min(schedule_px) >= 200


def test_images_grow_with_block_count(written):
    _, sizes = written
    change_h = [sizes[k][0][1] for k in COUNTS]
    schedule_h = [sizes[k][1][1] for k in COUNTS]
    assert change_h == sorted(change_h) and len(set(change_h)) == len(COUNTS)
    assert schedule_h == sorted(schedule_h) and len(set(schedule_h)) == len(COUNTS)
    # Beyond MAX_LINES_PER_AXES blocks the change plot turns into a wider grid of panels.
    assert COUNTS[-1] > MAX_LINES_PER_AXES and sizes[60][0][0] > sizes[16][0][0]


def test_no_temporary_files_left(written):
    out, _ = written
    assert sorted(os.listdir(out)) == sorted([f"change{k}.png" for k in COUNTS] + [f"schedule{k}.png" for k in COUNTS])


def test_overwrite_and_parent_dirs(tmp_path):
    p = synthetic_profile(3, 5)
    target = tmp_path / "a" / "b" / "c.png"
    plot_change(p, target)
    first = target.read_bytes()
    plot_change(p, str(target), top=2)  # str paths work; an existing file is replaced
    assert target.read_bytes() != first
    assert sorted(os.listdir(target.parent)) == ["c.png"]


def test_change_without_std_and_single_step(tmp_path):
    assert plot_change(synthetic_profile(5, std=False), tmp_path / "nostd.png").stat().st_size > 5_000
    one = ChangeProfile(torch.zeros(1, 2), ["a", "b"])
    assert plot_change(one, tmp_path / "one.png").exists()
    with pytest.raises(ValueError):
        plot_change(one, tmp_path / "bad.png", top=0)


def test_top_many_blocks_falls_back_to_one_axes(tmp_path):
    p = synthetic_profile(60)
    w_top, _ = _size(plot_change(p, tmp_path / "top.png", top=8))
    w_all, _ = _size(plot_change(p, tmp_path / "all.png"))
    assert w_top < w_all


def test_schedule_extremes(tmp_path):
    names = [f"b{i}" for i in range(6)]
    for s in (Schedule.all_compute(12, names), Schedule.every(12, 12, names), Schedule.every(3, 40, names)):
        assert plot_schedule(s, tmp_path / "s.png").stat().st_size > 3_000


def test_lifetimes():
    mask = torch.tensor([[1, 1], [0, 1], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)
    assert lifetimes(mask) == [[(0, 2), (2, 3)], [(0, 1), (1, 1), (2, 2), (4, 1)]]
    # The lifetimes of a block tile the steps exactly.
    for spans in lifetimes(mask):
        assert sum(n for _, n in spans) == 5


def _grey_share(path):
    with Image.open(path) as im:
        px = list(im.convert("RGB").getdata())
    return sum(p == (224, 224, 224) for p in px) / len(px)  # the "not run" shading, 0.88 grey


def test_an_experts_steps_not_run_are_shaded(tmp_path):
    # Wan 2.2's low-noise expert: steps 6..19 of 20; its first (6) has no previous step.
    full = synthetic_profile(4)
    l1 = full.l1_rel.clone()
    l1[:7] = 0
    expert = ChangeProfile(l1, full.block_names, block_flops=full.block_flops, rest_flops=full.rest_flops,
                           active_steps=(6, 20))
    for name, profile in (("full", full), ("expert", expert)):
        plot_change(profile, tmp_path / f"change_{name}.png")
        plot_change(profile, tmp_path / f"top_{name}.png", top=2)
        plot_schedule(Schedule.for_budget(profile, 0.6), tmp_path / f"schedule_{name}.png")
    for kind in ("change", "top", "schedule"):
        assert _grey_share(tmp_path / f"{kind}_full.png") < 0.005
        assert _grey_share(tmp_path / f"{kind}_expert.png") > 0.05
