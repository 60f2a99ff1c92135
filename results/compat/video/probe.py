"""Probe bcc (block caching compiler) on newer diffusers video transformers.

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 .venv/bin/python probe.py [model ...] [--skip-inductor]

Models: ltx ltx2 cogvideox hunyuan15 skyreels2 skyreels2-df wanvace cosmos allegro (default: all).
Tiny random-weight configs, batch 2, 4 steps (different latents, decreasing timesteps,
the same conditioning), inputs shaped as each model's pipeline passes them.

Stages per model (results in results.json, merged per model):
  1 eager_forward     plain model forward works
  2 find_blocks       bcc.find_blocks, default selector ("attention")
  3 eager_all_true    bcc.compile(..., backend="eager"), all-True schedule vs plain model
  4 eager_random      seeded random schedule vs an independent forward-wrapper reference (below)
  5 inductor          default backend: all-True vs plain, set_schedule(random) vs eager bcc, graphs

Reference (stage 4, no bcc code): each block's forward is wrapped; at a recompute step it
runs and caches, per tensor output, `out - x` where x is the block's input of the same
name as the output (names from the block's `return` line in diffusers, table OUT_NAMES)
and of the same shape; else the whole output. At a reuse step it returns
`x_now + cached` (or the cached output).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

torch.set_num_threads(1)

import bcc  # noqa: E402
from bcc import BccError, Schedule  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 4
B = 2
TIMESTEPS = [999.0, 749.0, 499.0, 249.0]


def _ts(step, dtype=torch.float32):
    return torch.full((B,), TIMESTEPS[step], dtype=dtype)


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _text_mask(L):
    m = torch.ones(B, L, dtype=torch.long)
    m[1, L // 2:] = 0  # second prompt is shorter (padding)
    return m


# ----------------------------------------------------------------------------- builders
# each returns (model, step_fn, config); step_fn(step) -> (args, kwargs) for that step

def build_ltx():
    from diffusers import LTXVideoTransformer3DModel
    cfg = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
               num_layers=2, caption_channels=16)
    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(**cfg).eval()
    F, H, W, L = 2, 8, 8, 8
    text, mask = _rand(B, L, 16, seed=100), _text_mask(L).bool()  # pipeline: attention_mask.bool()

    def step(s):
        # pipeline packs latents to [B, F*H*W, C]; timestep = t.expand(B) (flow-match t in [0, 1000])
        return (), dict(hidden_states=_rand(B, F * H * W, 8, seed=s), encoder_hidden_states=text,
                        timestep=_ts(s), encoder_attention_mask=mask, num_frames=F, height=H, width=W,
                        rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)
    return m, step, cfg


def build_ltx2():
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
    cfg = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
               audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
               audio_cross_attention_dim=16, num_layers=2, caption_channels=16)
    torch.manual_seed(0)
    m = LTX2VideoTransformer3DModel(**cfg).eval()
    F, H, W, L, AF = 2, 8, 8, 8, 4
    text, mask = _rand(B, L, 16, seed=100), _text_mask(L)
    video_coords = m.rope.prepare_video_coords(B, F, H, W, torch.device("cpu"), fps=24.0)
    audio_coords = m.audio_rope.prepare_audio_coords(B, AF, torch.device("cpu"))

    def step(s):
        t = _ts(s)
        # pipeline_ltx2: sigma=timestep, use_cross_timestep=True (its default), precomputed coords
        return (), dict(hidden_states=_rand(B, F * H * W, 8, seed=s), audio_hidden_states=_rand(B, AF, 8, seed=50 + s),
                        encoder_hidden_states=text, audio_encoder_hidden_states=text, timestep=t, sigma=t,
                        encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=F, height=H,
                        width=W, fps=24.0, audio_num_frames=AF, video_coords=video_coords,
                        audio_coords=audio_coords, isolate_modalities=False, spatio_temporal_guidance_blocks=None,
                        perturbation_mask=None, use_cross_timestep=True, return_dict=False)
    return m, step, cfg


def build_cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
               text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
               max_text_seq_length=8, use_rotary_positional_embeddings=True)  # CogVideoX-5b style (rope)
    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(**cfg).eval()
    F, H, W, L, p = 3, 8, 8, 8, 2
    text = _rand(B, L, 16, seed=100)
    crops = get_resize_crop_region_for_grid((H // p, W // p), cfg["sample_width"] // p, cfg["sample_height"] // p)
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=crops, grid_size=(H // p, W // p), temporal_size=F)

    def step(s):
        # latents [B, F, C, H, W]; timestep = t.expand(B), integer DDIM timesteps
        return (), dict(hidden_states=_rand(B, F, 4, H, W, seed=s), encoder_hidden_states=text,
                        timestep=_ts(s, torch.long), image_rotary_emb=rope, return_dict=False)
    return m, step, cfg


def build_hunyuan15():
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel
    cfg = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16,
               rope_axes_dim=(4, 6, 6), task_type="t2v")
    torch.manual_seed(0)
    m = HunyuanVideo15Transformer3DModel(**cfg).eval()
    F, H, W, L, L2 = 2, 8, 8, 8, 4
    text, mask = _rand(B, L, 16, seed=100), _text_mask(L)
    text2, mask2 = _rand(B, L2, 16, seed=101), _text_mask(L2)
    image_embeds = torch.zeros(B, 4, 16)  # t2v pipeline: zeros
    cond = torch.zeros(B, 4, F, H, W)
    cmask = torch.zeros(B, 1, F, H, W)

    def step(s):
        x = torch.cat([_rand(B, 4, F, H, W, seed=s), cond, cmask], dim=1)
        return (), dict(hidden_states=x, image_embeds=image_embeds, timestep=_ts(s), encoder_hidden_states=text,
                        encoder_attention_mask=mask, encoder_hidden_states_2=text2, encoder_attention_mask_2=mask2,
                        return_dict=False)
    return m, step, cfg


def build_skyreels2():
    from diffusers import SkyReelsV2Transformer3DModel
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    torch.manual_seed(0)
    m = SkyReelsV2Transformer3DModel(**cfg).eval()
    F, H, W, L = 2, 8, 8, 8
    text = _rand(B, L, 16, seed=100)

    def step(s):
        # pipeline_skyreels_v2 (T2V): timestep = t.expand(B), enable_diffusion_forcing=False
        return (), dict(hidden_states=_rand(B, 4, F, H, W, seed=s), timestep=_ts(s), encoder_hidden_states=text,
                        return_dict=False)
    return m, step, cfg


def build_skyreels2_df():
    """SkyReels-V2 diffusion forcing (pipeline_skyreels_v2_diffusion_forcing): per-frame 2-D
    timesteps [B, F], enable_diffusion_forcing=True, fps conditioning (inject_sample_info) and
    the causal block mask (_set_ar_attention(causal_block_size=2))."""
    from diffusers import SkyReelsV2Transformer3DModel
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32, inject_sample_info=True,
               num_frame_per_block=2)
    torch.manual_seed(0)
    m = SkyReelsV2Transformer3DModel(**cfg).eval()
    # batch 1: with inject_sample_info, diffusers' DF path adds fps_projection(...).repeat(F, 1, 1)
    # ([B*F, 6, D]) to timestep_proj [B, F, 6, D], which only broadcasts for B == 1; the DF
    # pipeline calls the transformer once per guidance branch, batch = number of videos.
    F, H, W, L, B = 4, 8, 8, 8, 1
    text = _rand(B, L, 16, seed=100)

    def step(s):
        # asynchronous schedule: later frames are noisier (step_matrix row), fps list as the pipeline builds it
        t = torch.tensor([TIMESTEPS[s] - 60.0 * (F - 1 - f) for f in range(F)]).clamp_min(1.0)
        return (), dict(hidden_states=_rand(B, 4, F, H, W, seed=s), timestep=t.expand(B, -1).clone(),
                        encoder_hidden_states=text, enable_diffusion_forcing=True, fps=[1] * B, return_dict=False)
    return m, step, cfg


def build_wanvace():
    from diffusers import WanVACETransformer3DModel
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
               vace_in_channels=8)
    torch.manual_seed(0)
    m = WanVACETransformer3DModel(**cfg).eval()
    F, H, W, L = 2, 8, 8, 8
    text = _rand(B, L, 16, seed=100)
    control = _rand(B, 8, F, H, W, seed=102)  # conditioning latents (video latents + mask), fixed over steps
    scale = torch.ones(len(cfg["vace_layers"]))  # pipeline: conditioning_scale as a tensor

    def step(s):
        return (), dict(hidden_states=_rand(B, 4, F, H, W, seed=s), timestep=_ts(s), encoder_hidden_states=text,
                        control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False)
    return m, step, cfg


def build_cosmos():
    from diffusers import CosmosTransformer3DModel
    # concat_padding_mask=False: the True path calls torchvision's resize, and torchvision is
    # not installed in the venv (pipeline_cosmos_text2world passes padding_mask for it).
    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
               rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")
    torch.manual_seed(0)
    m = CosmosTransformer3DModel(**cfg).eval()
    F, H, W, L = 2, 8, 8, 8
    text = _rand(B, L, 16, seed=100)

    def step(s):
        # pipeline_cosmos_text2world: timestep = t.expand(B) (EDM c_noise, float), fps
        return (), dict(hidden_states=_rand(B, 4, F, H, W, seed=s), timestep=_ts(s) / 1000.0,
                        encoder_hidden_states=text, fps=30, return_dict=False)
    return m, step, cfg


def build_allegro():
    from diffusers import AllegroTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro
    cfg = dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=24, in_channels=4,
               out_channels=4, num_layers=2, cross_attention_dim=48, sample_height=8, sample_width=8,
               sample_frames=2, caption_channels=16)
    torch.manual_seed(0)
    m = AllegroTransformer3DModel(**cfg).eval()
    F, H, W, L, p = 2, 8, 8, 8, 2
    text, mask = _rand(B, L, 16, seed=100), _text_mask(L)
    ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (H // p, W // p)), grid_size=(H // p, W // p), temporal_size=F,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    rope = ((ft, fh, fw), tuple(pos.contiguous()))

    def step(s):
        # pipeline_allegro: timestep = t.expand(B) (EulerAncestral, integer-valued), mask long
        return (), dict(hidden_states=_rand(B, 4, F, H, W, seed=s), encoder_hidden_states=text,
                        encoder_attention_mask=mask, timestep=_ts(s, torch.long), image_rotary_emb=rope,
                        return_dict=False)
    return m, step, cfg


BUILDERS = {
    "ltx": build_ltx, "ltx2": build_ltx2, "cogvideox": build_cogvideox, "hunyuan15": build_hunyuan15,
    "skyreels2": build_skyreels2, "skyreels2-df": build_skyreels2_df, "wanvace": build_wanvace, "cosmos": build_cosmos, "allegro": build_allegro,
}

# output names of each block class's forward (its `return` line in diffusers)
OUT_NAMES = {
    "LTX2VideoTransformerBlock": ("hidden_states", "audio_hidden_states"),
    "CogVideoXBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideo15TransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "WanVACETransformerBlock": ("conditioning_states", "control_hidden_states"),
}
# the residual bases bcc chose where they differ from the by-name rule (read from
# fast.bcc_slots() and its BccWarnings); a second reference with these must match bcc exactly
BCC_POLICY = {
    # CosmosTransformerBlock: `hidden_states = hidden_states + extra_pos_emb` at its top, so two
    # inputs reach the output along an identity path: bcc caches it whole (BccWarning)
    "cosmos": {("transformer_blocks.0", 0): None, ("transformer_blocks.1", 0): None},
    # WanVACETransformerBlock 0: `control = proj_in(control) + hidden_states`: the identity path
    # of its control output leads to hidden_states, not to the control input of that name
    "wanvace": {("vace_blocks.0", 1): "hidden_states"},
}

# what a user means by "the transformer blocks": the per-layer stack
EXPECTED = {
    "ltx": {"LTXVideoTransformerBlock": 2},
    "ltx2": {"LTX2VideoTransformerBlock": 2},
    "cogvideox": {"CogVideoXBlock": 2},
    "hunyuan15": {"HunyuanVideo15TransformerBlock": 2},
    "skyreels2": {"SkyReelsV2TransformerBlock": 2},
    "skyreels2-df": {"SkyReelsV2TransformerBlock": 2},
    "wanvace": {"WanTransformerBlock": 2},  # + VACE's control blocks are arguably conditioning
    "cosmos": {"CosmosTransformerBlock": 2},
    "allegro": {"AllegroTransformerBlock": 2},
}


# ----------------------------------------------------------------------------- helpers

def error_record(stage, e):
    tb = traceback.extract_tb(e.__traceback__)
    def inner(pred):
        fr = [f for f in tb if pred(f.filename)]
        return f"{fr[-1].filename.split('site-packages/')[-1].replace('', '')}:{fr[-1].lineno} in {fr[-1].name}" if fr else None
    msg = str(e).strip().splitlines()
    chain, c, seen = [], e.__cause__ or e.__context__, set()
    while c is not None and id(c) not in seen and len(chain) < 4:
        seen.add(id(c))
        chain.append(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0][:300]}")
        c = c.__cause__ or c.__context__
    return {
        "ok": False, "stage": stage, "type": f"{type(e).__module__}.{type(e).__name__}",
        "is_bcc_error": isinstance(e, BccError), "bcc_internal": isinstance(e, bcc.BccInternalError),
        "code": getattr(getattr(e, "code", None), "value", None),
        "first_line": (msg or [""])[0][:400], "message_head": "\n".join(msg[:8])[:2000],
        "frame_bcc": inner(lambda f: "bcc/" in f or "passes/" in f),
        "frame_torch": inner(lambda f: "site-packages/torch/" in f),
        "frame_diffusers": inner(lambda f: "site-packages/diffusers/" in f),
        "frame_innermost": inner(lambda f: True),
        "cause_chain": chain,
    }


def leaves(out):
    return [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]


def rel_err(a, b):
    """max over outputs and steps of max|a-b| / max|b|."""
    worst = 0.0
    for oa, ob in zip(a, b):
        for x, y in zip(leaves(oa), leaves(ob)):
            worst = max(worst, float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)))
    return worst


def exactly_equal(a, b):
    return all(torch.equal(x, y) for oa, ob in zip(a, b) for x, y in zip(leaves(oa), leaves(ob)))


def run_steps(fn, step_fn):
    outs = []
    with torch.no_grad():
        for s in range(STEPS):
            a, k = step_fn(s)
            outs.append(pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, fn(*a, **k)))
    return outs


def random_schedule(names, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(STEPS, len(names), generator=g) < 0.5
    mask[0] = True
    mask[1, 0], mask[1, -1] = False, True
    return Schedule(mask, tuple(names))


def all_true(names):
    return Schedule(torch.ones(STEPS, len(names), dtype=torch.bool), tuple(names))


class Reference:
    """Block caching by forward wrappers (no bcc code); one model call per step."""

    def __init__(self, model, names, mask, override=None):
        self.mask, self.step, self.caches, self.log = mask, -1, {}, []
        self.override = override or {}
        for i, n in enumerate(names):
            mod = model.get_submodule(n)
            mod.forward = self._wrap(i, n, type(mod).__name__, mod.forward)
        model.register_forward_pre_hook(lambda *_: self._advance())

    def _advance(self):
        self.step += 1

    def _wrap(self, i, name, cls, fwd):
        sig = inspect.signature(fwd)

        def wrapped(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            inputs = bound.arguments
            if bool(self.mask[self.step, i]) or i not in self.caches:
                out = fwd(*args, **kwargs)
                flat, spec = pytree.tree_flatten(out)
                names = OUT_NAMES.get(cls, ("hidden_states",)) if isinstance(out, (tuple, list)) or torch.is_tensor(out) else ()
                bases, cached = [], []
                for j, v in enumerate(flat):
                    base = names[j] if j < len(names) else None
                    base = self.override.get((name, j), base)
                    x = inputs.get(base) if base else None
                    if not (torch.is_tensor(v) and torch.is_tensor(x) and x.shape == v.shape):
                        base = None
                    bases.append(base)
                    cached.append((v - inputs[base]).detach().clone() if base else (v.detach().clone() if torch.is_tensor(v) else v))
                self.caches[i] = (spec, bases, cached)
                if self.step == 0:
                    self.log.append({"block": name, "class": cls, "bases": bases})
                return out
            spec, bases, cached = self.caches[i]
            flat = [inputs[b] + c if b else c for b, c in zip(bases, cached)]
            return pytree.tree_unflatten(flat, spec)
        return wrapped


def per_block_diffs(name, names, sched, step_fn):
    """Where bcc-eager and the reference first diverge: per block, per step, max|diff| of block outputs."""
    rows = []
    model_a, _, _ = BUILDERS[name]()
    model_b, _, _ = BUILDERS[name]()
    ref = Reference(model_b, names, sched.mask)
    fast = bcc.compile(model_a, sched, backend="eager")
    # record the reference's block outputs via forward hooks on the wrapped modules
    rec_b = {}
    for n in names:
        model_b.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: rec_b.setdefault(n, []).append(leaves(o)))
    outs_a = run_steps(fast, step_fn)
    outs_b = run_steps(model_b, step_fn)
    for s in range(STEPS):
        rows.append({"step": s, "row": sched.mask[s].int().tolist(),
                     "final_max_abs": max(float((x - y).abs().max()) for x, y in zip(leaves(outs_a[s]), leaves(outs_b[s])))})
    return rows, ref.log


# ----------------------------------------------------------------------------- stages

def probe(name, skip_inductor=False):
    res = {"model": name, "stages": {}}
    st = res["stages"]
    t0 = time.time()
    model, step_fn, cfg = BUILDERS[name]()
    res["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    res["class"] = type(model).__name__
    res["params"] = sum(p.numel() for p in model.parameters())

    # 1. plain eager forward
    try:
        plain = run_steps(model, step_fn)
        st["eager_forward"] = {"ok": True, "out_shapes": [list(t.shape) for t in leaves(plain[0])],
                               "seconds": round(time.time() - t0, 2)}
    except Exception as e:
        st["eager_forward"] = error_record("eager_forward", e)
        return res
    print(f"[{name}] 1 eager forward ok {st['eager_forward']['out_shapes']}", flush=True)

    # 2. find_blocks
    t = time.time()
    try:
        a, k = step_fn(0)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            found = bcc.find_blocks(model, (a, k))
        recs = [(b, type(model.get_submodule(b)).__name__) if isinstance(b, str) else (b.name, b.class_name)
                for b in found]
        names = [n for n, _ in recs]
        counts = {}
        for _, c in recs:
            counts[c] = counts.get(c, 0) + 1
        st["find_blocks"] = {"ok": True, "return_type": type(found[0]).__name__ if found else None,
                             "blocks": [f"{n} ({c})" for n, c in recs], "counts": counts,
                             "matches_per_layer_stack": counts == EXPECTED[name],
                             "warnings": [f"{x.category.__name__}: {str(x.message)[:300]}" for x in w
                                          if "bcc" in x.category.__module__ or "Bcc" in x.category.__name__],
                             "seconds": round(time.time() - t, 2)}
    except Exception as e:
        st["find_blocks"] = error_record("find_blocks", e)
        print(f"[{name}] 2 find_blocks FAIL {st['find_blocks']['first_line']}", flush=True)
        # fall back to the per-layer stack so later stages still say something
        names = [n for n, mm in model.named_modules() if type(mm).__name__ in EXPECTED[name]]
        st["find_blocks"]["fallback_blocks"] = names
    print(f"[{name}] 2 find_blocks {st['find_blocks'].get('blocks', st['find_blocks'].get('first_line'))}", flush=True)
    res["names"] = names
    sched_all, sched_rand = all_true(names), random_schedule(names)
    res["random_mask"] = sched_rand.mask.int().tolist()

    # 3. eager all-True
    t = time.time()
    try:
        m3, _, _ = BUILDERS[name]()
        fast = bcc.compile(m3, sched_all, backend="eager")
        out3 = run_steps(fast, step_fn)
        st["eager_all_true"] = {"ok": True, "equal": exactly_equal(out3, plain), "max_rel": rel_err(out3, plain),
                                "graphs": fast.bcc_stats()["graphs"], "seconds": round(time.time() - t, 2)}
    except Exception as e:
        st["eager_all_true"] = error_record("eager_all_true", e)
    print(f"[{name}] 3 eager all-True {_short(st['eager_all_true'])}", flush=True)

    # 4. eager random vs reference
    t = time.time()
    eager_rand = None
    try:
        mref, _, _ = BUILDERS[name]()
        ref = Reference(mref, names, sched_rand.mask)
        out_ref = run_steps(mref, step_fn)
        st.setdefault("eager_random", {})["reference_bases"] = ref.log
    except Exception as e:
        st["eager_random"] = error_record("eager_random(reference)", e)
        out_ref = None
    try:
        m4, _, _ = BUILDERS[name]()
        with warnings.catch_warnings(record=True) as wlog:
            warnings.simplefilter("always")
            fast = bcc.compile(m4, sched_rand, backend="eager")
            eager_rand = run_steps(fast, step_fn)
        rec = st.setdefault("eager_random", {})
        rec.update({"ok": True, "graphs": fast.bcc_stats()["graphs"], "seconds": round(time.time() - t, 2)})
        try:
            rec["bcc_slots"] = [f"{x.block} out{x.output} base={x.base} stream={x.stream} {list(x.shape)}" for x in fast.bcc_slots()]
        except Exception as e:  # informational only
            rec["bcc_slots"] = f"unavailable: {type(e).__name__}"
        if out_ref is not None:
            rec["equal_ref"] = exactly_equal(eager_rand, out_ref)
            rec["max_rel_ref"] = rel_err(eager_rand, out_ref)
            rec["per_step_max_rel_ref"] = [rel_err([a], [b]) for a, b in zip(eager_rand, out_ref)]
            rec["max_rel_vs_plain"] = rel_err(eager_rand, plain)  # > 0: caching did something
            if name in BCC_POLICY:
                mpol, _, _ = BUILDERS[name]()
                Reference(mpol, names, sched_rand.mask, BCC_POLICY[name])
                out_pol = run_steps(mpol, step_fn)
                rec["bcc_policy_override"] = {f"{b}[{j}]": v for (b, j), v in BCC_POLICY[name].items()}
                rec["equal_ref_with_bcc_policy"] = exactly_equal(eager_rand, out_pol)
                rec["max_rel_ref_with_bcc_policy"] = rel_err(eager_rand, out_pol)
            rec["bcc_warnings"] = [str(x.message)[:400] for x in wlog if "Bcc" in x.category.__name__]
    except Exception as e:
        prev = st.get("eager_random", {})
        st["eager_random"] = error_record("eager_random", e)
        if "reference_bases" in prev:
            st["eager_random"]["reference_bases"] = prev["reference_bases"]
    print(f"[{name}] 4 eager random {_short(st['eager_random'])}", flush=True)

    # 5. inductor
    if skip_inductor:
        return res
    t = time.time()
    rec = st["inductor"] = {}
    try:
        m5, _, _ = BUILDERS[name]()
        fast = bcc.compile(m5, sched_all)
        out5 = run_steps(fast, step_fn)
        rec.update({"ok": True, "all_true_max_rel_plain": rel_err(out5, plain),
                    "compile_and_run_seconds": round(time.time() - t, 1)})
        rec["graphs_after_all_true"] = fast.bcc_stats()["graphs"]
    except Exception as e:
        st["inductor"] = error_record("inductor(all-True)", e)
        st["inductor"]["seconds"] = round(time.time() - t, 1)
        print(f"[{name}] 5 inductor {_short(st['inductor'])}", flush=True)
        return res
    try:
        fast.set_schedule(sched_rand)
        out6 = run_steps(fast, step_fn)
        rec["random_max_rel_eager_bcc"] = rel_err(out6, eager_rand) if eager_rand is not None else None
        rec["random_max_rel_reference"] = rel_err(out6, out_ref) if out_ref is not None else None
        rec["graphs"] = fast.bcc_stats()["graphs"]
        rec["stats"] = {k: v for k, v in fast.bcc_stats().items()}
        rec["seconds"] = round(time.time() - t, 1)
    except Exception as e:
        err = error_record("inductor(random via set_schedule)", e)
        rec.update({"ok": False, "random_error": err})
    print(f"[{name}] 5 inductor {_short(rec)}", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _short(r):
    if not r.get("ok", True) and "type" in r:
        return f"FAIL {r['type']} {r.get('code')} {r['first_line'][:200]}"
    return {k: v for k, v in r.items() if k not in ("reference_bases", "bcc_slots", "stats", "per_step_max_rel_ref")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=list(BUILDERS))
    p.add_argument("--skip-inductor", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    a = p.parse_args()
    for name in a.models:
        try:
            r = probe(name, a.skip_inductor)
        except Exception as e:  # a probe bug, recorded rather than lost
            r = {"model": name, "probe_error": error_record("probe", e)}
            traceback.print_exc()
        allres = {}
        if os.path.exists(a.out):
            with open(a.out) as f:
                allres = json.load(f)
        if a.skip_inductor and name in allres and "inductor" in allres[name].get("stages", {}):
            r["stages"]["inductor"] = allres[name]["stages"]["inductor"]
        allres[name] = r
        with open(a.out, "w") as f:
            json.dump(allres, f, indent=1, default=str)


if __name__ == "__main__":
    main()
