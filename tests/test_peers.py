"""The peer adapters (bcc.tools.bench.peers): each peer runs in an ordinary loop, skips work when
aggressive and none when neutral, leaks no state across trajectories, and leaves the model
exactly as it found it."""
import pickle

import pytest
import torch

from bcc.tools.bench.peers import PeerSetting, enable, magcache_ratios, peer_settings, timestep_schedule
from bcc.tools.bench.peers_compile import compile_report
from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample

from testing import built

STEPS = 6
_DIGITS: dict = {}


def digits(arch):
    if arch not in _DIGITS:
        _DIGITS[arch] = load_digits_model(default_model_dir(arch))
    return _DIGITS[arch]


def digits_run(arch, steps=STEPS):
    """(model, scheduler, run(denoiser) -> images) for the shipped model, fixed noise."""
    model, cond, train = digits(arch)
    sched = make_scheduler("ddim", train)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, sched, lambda den: sample(den, cond, sched, [3, 7], num_steps=steps, guidance_scale=3.0, noise=noise)


def zoo_run(name, steps=STEPS, latent=8):
    """(model, scheduler, run(denoiser) -> last output) for a plain per-step loop on a zoo model."""
    model, args, kwargs = built(name, latent=latent)
    sched = timestep_schedule(steps)

    def run(den):
        outs = []
        with torch.no_grad():
            for t in sched.timesteps:
                if "timestep" in kwargs:
                    outs.append(den(args[0], **{**kwargs, "timestep": t.expand(args[0].shape[0])})[0])
                else:
                    outs.append(den(args[0], t, **kwargs)[0])
        return torch.stack(outs)
    return model, sched, run


def untouched(model):
    """No peer leftovers: class, forwards and hook registries as a fresh model has them."""
    return all(not ({"forward", "_diffusers_hook", "_cache_config"} & set(m.__dict__)) for m in model.modules()) and \
        type(model).__name__ in ("UNet2DConditionModel", "PixArtTransformer2DModel")


def check_peer(model, sched, run, setting, *, skips, calibrate=None):
    base = run(model)
    with enable(model, setting, sched, calibrate=calibrate) as den:
        first = run(den)
        second = run(den)  # same noise: a leak of cached state would change it
        stats = den.stats()
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert stats.calls == 2 * STEPS
    if skips:
        assert stats.executed_fraction < 1.0 and stats.unit_forwards_executed < stats.unit_forwards_full
    else:
        assert stats.executed_fraction == 1.0 and stats.unit_forwards_executed == stats.unit_forwards_full
        assert torch.equal(first, base)  # nothing skipped: exactly the plain model
    assert untouched(model)
    assert torch.equal(run(model), base)  # restored: the untouched model's outputs again
    return first, base


def test_settings_sweeps():
    unet, dit = peer_settings("unet"), peer_settings("dit")
    assert {s.peer for s in unet} == {"deepcache"} and {s.peer for s in dit} == {"fbc", "taylorseer", "magcache", "pab"}
    assert len({s.label for s in unet + dit}) == len(unet + dit)
    assert len(set(unet + dit)) == len(unet + dit)  # hashable, distinct
    assert pickle.loads(pickle.dumps(dit)) == dit
    with pytest.raises(Exception):
        unet[0].params["cache_interval"] = 9  # frozen
    with pytest.raises(ValueError):
        peer_settings("vae")
    with pytest.raises(ValueError):
        PeerSetting("teacache", "x", {})


def test_deepcache_zoo_loop():
    pytest.importorskip("DeepCache")
    model, sched, run = zoo_run("unet-tiny")
    check_peer(model, sched, run, PeerSetting("deepcache", "N=1", {"cache_interval": 1, "cache_branch_id": 0}), skips=False)
    out, base = check_peer(model, sched, run, PeerSetting("deepcache", "N=3", {"cache_interval": 3, "cache_branch_id": 0}),
                           skips=True)
    assert torch.equal(out[0], base[0])  # step 0 is always a full step


def test_deepcache_digits_sample():
    pytest.importorskip("DeepCache")
    model, sched, run = digits_run("unet")
    mild, aggressive = [s for s in peer_settings("unet") if s.label in ("DeepCache N=2 b=3", "DeepCache N=5 b=0")]
    fractions = []
    for s in (mild, aggressive):
        with enable(model, s, sched) as den:
            run(den)
            fractions.append(den.executed_fraction())
    assert 0.0 < fractions[1] < fractions[0] < 1.0
    check_peer(model, sched, run, aggressive, skips=True)


@pytest.mark.parametrize("peer,aggressive,neutral", [
    ("fbc", {"threshold": 0.5}, {"threshold": 0.0}),
    ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 1, "taylor_factors_dtype": "float32",
                    "cache_identifiers": (r"transformer_blocks\.\d+\.attn\d",)},
     {"cache_interval": 1, "disable_cache_before_step": 1, "taylor_factors_dtype": "float32",
      "cache_identifiers": (r"transformer_blocks\.\d+\.attn\d",)}),
    ("magcache", {"threshold": 0.5, "retention_ratio": 0.2}, {"threshold": 0.0}),
    ("pab", {"spatial_attention_block_skip_range": 3, "cross_attention_block_skip_range": 3,
             "spatial_attention_timestep_skip_range": (0, 1000), "cross_attention_timestep_skip_range": (0, 1000)},
     {"spatial_attention_block_skip_range": 1, "cross_attention_block_skip_range": 1}),
])
def test_diffusers_hooks_digits_dit(peer, aggressive, neutral):
    model, sched, run = digits_run("dit")
    calibrate = run if peer == "magcache" else None
    check_peer(model, sched, run, PeerSetting(peer, "aggressive", aggressive), skips=True, calibrate=calibrate)
    check_peer(model, sched, run, PeerSetting(peer, "neutral", neutral), skips=False, calibrate=calibrate)


def test_every_dit_setting_runs_on_zoo_pixart():
    model, sched, run = zoo_run("pixart", latent=4)
    ratios = magcache_ratios(model, sched, run)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    for s in peer_settings("dit"):
        with enable(model, s, sched, calibrate=ratios) as den:
            out = run(den)
            assert torch.isfinite(out).all() and 0.0 < den.executed_fraction() <= 1.0, s.label
    assert untouched(model)


def test_magcache_needs_ratios_and_errors_restore():
    model, sched, run = zoo_run("pixart", latent=4)
    with pytest.raises(ValueError, match="MagCache"):
        with enable(model, PeerSetting("magcache", "m", {"threshold": 0.1}), sched):
            pass
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        with enable(model, PeerSetting("fbc", "f", {"threshold": 0.1}), timestep_schedule(3, [1, 2, 3])) as den:
            run(den)
    assert untouched(model)


def test_stats_count_calls_shapes_and_reset():
    model, args, kwargs = built("pixart", latent=4)
    sched = timestep_schedule(4)
    with enable(model, PeerSetting("fbc", "f", {"threshold": 0.0}), sched) as den, torch.no_grad():
        for batch in (2, 1):  # a new input shape is measured on its own
            for t in sched.timesteps:
                den(args[0][:batch], **{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:batch],
                                       "timestep": t.expand(batch)})
        s = den.stats()
        assert s.calls == 8 and s.unit_forwards_full == 16 and s.executed_fraction == 1.0
        den.reset_stats()
        assert den.stats().calls == 0 and den.executed_fraction() == 1.0


def test_compiled_counters_match_eager():
    model, sched, run = zoo_run("pixart", latent=4)
    setting = PeerSetting("fbc", "f", {"threshold": 0.5})
    fractions, outs = [], []
    for compile in (False, {"backend": "eager"}, {"backend": "eager", "regional": True}):
        with enable(model, setting, sched, compile=compile, count=True) as den:
            outs.append(run(den))
            fractions.append(den.stats())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert fractions[0] == fractions[1] == fractions[2] and fractions[0].executed_fraction < 1.0
    assert untouched(model)


def test_compile_report_fbc():
    model, sched, run = zoo_run("pixart", steps=4, latent=4)
    r = compile_report(model, PeerSetting("fbc", "f", {"threshold": 0.5}), lambda d: run(d)[-1], scheduler=sched,
                       backend="eager")
    assert r["fullgraph"] is False and r["fullgraph_error"].startswith("Unsupported")
    assert r["graphs"] >= 2 and r["graph_breaks"] >= 1 and r["break_reasons"]
    assert len(r["graphs_per_call"]) == 4 and r["graphs_per_call"][-1] == r["graphs"]
    assert r["graphs_second_trajectory"] >= 0 and r["recompiles"] >= 1  # FBC guards on its skip decision
    assert r["matches_eager"] and r["max_abs_diff"] == 0.0
    assert 0.0 < r["eager_executed_fraction"] < 1.0
    assert untouched(model)
