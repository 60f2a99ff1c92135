"""Tiny diffusers pipelines assembled offline from random components, and an independent
reference of block caching inside a pipeline.

Builders (each deterministic given ``seed``; nothing is downloaded): ``sd``, ``sdxl``,
``pixart_sigma``, ``sd3``, ``flux``, ``wan`` and the img2img variants made with
``from_pipe`` (``sd_img2img``, ``sdxl_img2img``, ``sd3_img2img``, ``flux_img2img``).
``generate(pipe, ...)`` runs one of them with small per-class defaults.

``PipelineCachingReference`` applies a block-caching schedule to a pipeline in place,
written without any of bcc's code: it learns each denoiser call's step from the
pipeline's scheduler (``set_timesteps`` starts a generation; the step of a call is the
begin index plus the number of ``step()`` calls since; the k-th denoiser call since the
last ``step()`` belongs to stream k) and keeps one cache per (stream, block).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

__all__ = [
    "BUILDERS", "generate", "clip_tokenizer", "t5_tokenizer", "sd", "sdxl", "pixart_sigma", "sd3", "flux", "wan",
    "sd_img2img", "sdxl_img2img", "sd3_img2img", "flux_img2img", "init_image", "denoiser_attrs",
    "default_blocks", "PipelineCachingReference", "every",
]

PROMPTS = ["a red 3", "a blue 7"]  # short: the offline tokenizers are character-level
NEGATIVE = ["blurry", "noisy"]
TEXT_LEN = 12  # T5/UMT5 tokens per prompt (max_sequence_length); CLIP takes 16. Differs from image tokens.


# -- offline tokenizers and text encoders ------------------------------------------------
def one_thread():
    """Fixture body (autouse in the pipeline test modules): the tiny pipelines' ops run on one
    intra-op thread, since a second one only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_tokenizer():
    """testing.tiny_tokenizer: a byte-level CLIP tokenizer from a generated vocab (no merges), 16 tokens."""
    from testing import tiny_tokenizer  # imported late: testing imports bcc, the reference below does not

    return tiny_tokenizer()


def t5_tokenizer(model_max_length: int = 64):
    """A character-level T5-style fast tokenizer (pad 0, eos 1, unk 2) built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["▁"]
    vocab = {tok: i for i, tok in enumerate(specials + [c for c in chars if c != " "])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _clip_text(tokenizer, projection: bool = False, hidden: int = 32, proj: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=proj,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5_encoder(tokenizer, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**cfg)).eval()
    return T5EncoderModel(T5Config(**cfg)).eval()


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        **extra,
    ).eval()


def _seeded(build):
    """Run a builder under a forked, seeded global RNG (the caller's RNG state is untouched)."""

    @functools.wraps(build)
    def wrapper(seed: int = 0, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = build(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return wrapper


# -- builders ----------------------------------------------------------------------------
def sd(seed: int = 0, scheduler=None):
    """StableDiffusionPipeline (SD 1.x): UNet2DConditionModel, DDIM, 8x8 latent (testing.tiny_sd_pipeline)."""
    from testing import tiny_sd_pipeline

    with torch.random.fork_rng(devices=[]):
        pipe = tiny_sd_pipeline(seed)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


@_seeded
def sdxl(scheduler=None):
    """StableDiffusionXLPipeline: two CLIP encoders, text-time added conditions, Euler, 8x8 latent."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    text_encoder = _clip_text(tokenizer)
    text_encoder_2 = _clip_text(tokenizer_2, projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 1),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@_seeded
def pixart_sigma(scheduler=None):
    """PixArtSigmaPipeline: PixArtTransformer2DModel (2 layers), T5 encoder, DPM-Solver++, 8x8 latent."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    scheduler = scheduler or DPMSolverMultistepScheduler()
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(), transformer=transformer,
                               scheduler=scheduler)


@_seeded
def sd3(scheduler=None):
    """StableDiffusion3Pipeline: SD3Transformer2DModel (2 joint blocks), 2 CLIP + T5, flow-match Euler, 8x8 latent."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_text(tokenizer, projection=True)
    text_encoder_2 = _clip_text(tokenizer_2, projection=True)
    text_encoder_3 = _t5_encoder(tokenizer_3, d_model=64)  # >= both CLIP hidden sizes together (pad target)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    vae = _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
               use_post_quant_conv=False)
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


@_seeded
def flux(scheduler=None):
    """FluxPipeline: FluxTransformer2DModel (1 double, 1 single block), CLIP + T5, dynamic-shift flow Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip_text(tokenizer)
    text_encoder_2 = _t5_encoder(tokenizer_2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    vae = _vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
               use_post_quant_conv=False)
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


@_seeded
def wan(scheduler=None, two_experts: bool = False):
    """WanPipeline (9-frame video): WanTransformer3DModel (2 blocks), UMT5, UniPC; two_experts: Wan 2.2 MoE."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32, umt5=True)

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()

    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                           scale_factor_temporal=2, scale_factor_spatial=4).eval()
    scheduler = scheduler or UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer(), transformer_2=transformer() if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None)


def _from_pipe(cls_name: str, base):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_img2img(base=None, seed: int = 0):
    """StableDiffusionImg2ImgPipeline made with `from_pipe` from `base` (or a fresh `sd(seed)`): shares its modules."""
    return _from_pipe("StableDiffusionImg2ImgPipeline", base if base is not None else sd(seed))


def sdxl_img2img(base=None, seed: int = 0):
    """StableDiffusionXLImg2ImgPipeline made with `from_pipe` from `base` (or a fresh `sdxl(seed)`)."""
    return _from_pipe("StableDiffusionXLImg2ImgPipeline", base if base is not None else sdxl(seed))


def sd3_img2img(base=None, seed: int = 0):
    """StableDiffusion3Img2ImgPipeline made with `from_pipe` from `base` (or a fresh `sd3(seed)`)."""
    return _from_pipe("StableDiffusion3Img2ImgPipeline", base if base is not None else sd3(seed))


def flux_img2img(base=None, seed: int = 0):
    """FluxImg2ImgPipeline made with `from_pipe` from `base` (or a fresh `flux(seed)`)."""
    return _from_pipe("FluxImg2ImgPipeline", base if base is not None else flux(seed))


BUILDERS: dict[str, Callable] = {
    "sd": sd, "sdxl": sdxl, "pixart_sigma": pixart_sigma, "sd3": sd3, "flux": flux, "wan": wan,
}


# -- running them ----------------------------------------------------------------------------
def init_image(size: int = 16, seed: int = 0) -> torch.Tensor:
    """A deterministic (1, 3, size, size) image in [0, 1] for img2img."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g)


def _defaults(pipe) -> dict:
    name = type(pipe).__name__
    kw: dict = {"prompt": list(PROMPTS)}
    if name.startswith("StableDiffusion3"):
        kw.update(max_sequence_length=TEXT_LEN, guidance_scale=5.0, height=16, width=16)
    elif name.startswith("StableDiffusionXL"):
        kw.update(guidance_scale=5.0, height=16, width=16)
    elif name.startswith("StableDiffusion"):
        kw.update(guidance_scale=5.0, height=16, width=16)
    elif name.startswith("PixArt"):
        kw.update(guidance_scale=4.5, height=16, width=16, max_sequence_length=TEXT_LEN,
                  use_resolution_binning=False, clean_caption=False)
    elif name.startswith("Flux"):
        kw.update(guidance_scale=3.5, height=16, width=16, max_sequence_length=TEXT_LEN)
    elif name.startswith("Wan"):
        kw.update(guidance_scale=1.0, height=16, width=16, num_frames=9, max_sequence_length=TEXT_LEN)
    if "Img2Img" in name:
        kw.update(image=init_image(16), strength=0.6)
    return kw


def generate(pipe, steps: int = 6, seed: int = 0, output_type: str = "latent", **overrides):
    """Run `pipe` for `steps` steps from `seed` with small per-class defaults; returns `.images` (or `.frames`)."""
    kw = _defaults(pipe)
    kw.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type=output_type)
    kw.update(overrides)
    with torch.no_grad():
        out = pipe(**kw)
    return out.frames if hasattr(out, "frames") else out.images


# -- an independent reference of block caching inside a pipeline ------------------------------
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")


def denoiser_attrs(pipe) -> list[str]:
    """The pipeline attributes holding a denoiser (`unet`, `transformer`, `transformer_2`) that are set."""
    return [a for a in DENOISER_ATTRS if isinstance(getattr(pipe, a, None), torch.nn.Module)]


def default_blocks(pipe) -> list[tuple[str, str]]:
    """(denoiser attribute, module name) of the attention blocks: UNet Transformer2DModels, DiT layer blocks."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = []
    for attr in denoiser_attrs(pipe):
        model = getattr(pipe, attr)
        if attr == "unet":  # in execution order: down, mid, up (named_modules puts mid_block last)
            names = [n for n, m in model.named_modules() if isinstance(m, Transformer2DModel)]
            rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
            blocks += [(attr, n) for n in sorted(names, key=lambda n: rank.get(n.split(".")[0], 3))]
            continue
        for list_name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            layers = getattr(model, list_name, None)
            if isinstance(layers, torch.nn.ModuleList):
                blocks += [(attr, f"{list_name}.{i}") for i in range(len(layers))]
    return blocks


def every(n: int, num_blocks: int) -> Callable[[int, int], list[bool]]:
    """A schedule recomputing every block at steps 0, n, 2n, ... of any step count."""
    return lambda step, num_steps: [step % n == 0] * num_blocks


def stream_inputs(forward, args, kwargs) -> list[torch.Tensor]:
    """A block call's stream inputs: `hidden_states` (else its first positional tensor), then
    `encoder_hidden_states` when passed. A Cosmos block adds `extra_pos_emb` to its hidden
    states before anything else: the stream is their sum."""
    bound = inspect.signature(forward).bind(*args, **kwargs).arguments
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    pos = bound.get("extra_pos_emb")
    if isinstance(x, torch.Tensor) and isinstance(pos, torch.Tensor) and pos.shape == x.shape:
        x = x + pos
    streams = [x] if isinstance(x, torch.Tensor) else []
    ctx = bound.get("encoder_hidden_states")
    if isinstance(ctx, torch.Tensor):
        streams.append(ctx)
    return streams

def residual_bases(leaves, streams) -> list[int | None]:
    """For each output leaf, the stream input it is a residual of (same shape and dtype), or None."""
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def fits(v, s):
        return s.shape == v.shape and s.dtype == v.dtype

    if len(tensors) == 1:  # one output: the residual of the main stream, if shaped like it
        v = leaves[tensors[0]]
        return [0 if i == tensors[0] and streams and fits(v, streams[0]) else None for i in range(len(leaves))]
    bases: list[int | None] = [None] * len(leaves)
    used: set[int] = set()
    for i in tensors:
        match = [k for k, s in enumerate(streams) if fits(leaves[i], s)]
        if len(match) > 1:
            raise ValueError("ambiguous residual pairing: two stream inputs share an output's shape")
        if match:
            if match[0] in used:
                raise ValueError("two outputs pair with the same stream input")
            used.add(match[0])
            bases[i] = match[0]
    return bases


class PipelineCachingReference:
    """Apply block caching to `pipe` in place (eager Python; no bcc code); `remove()` undoes it.

    `schedule(step, num_steps)` returns one bool per block of `self.blocks` (True: recompute).
    Step identity comes from `pipe.scheduler`, whose instance methods are wrapped (their
    signatures kept, since pipelines inspect them): `set_timesteps` starts a generation
    (caches cleared; `num_steps = len(scheduler.timesteps)`), `set_begin_index(b)` sets the
    begin index (for schedulers without that method, e.g. DDIM or PNDM, it is the position
    of the first call's timestep in `scheduler.timesteps`), and each `step()` advances the
    step and resets the stream counter. A denoiser call's step is begin + steps since; the
    k-th denoiser call since the last `step()` is stream k. Caches are kept per (stream,
    block); a block recomputes at its first call of each stream in a generation whatever
    the schedule says. A recomputed block caches, for every tensor output, `out - x` where
    `x` is the stream input of the same shape (`hidden_states`, else the first positional
    tensor; for two-stream blocks returning a tuple, also `encoder_hidden_states`), or the
    whole output when no stream input has its shape; reuse returns `x_now + cached` (or a
    copy of the cached output). When a block that should reuse finds its stream inputs
    shaped unlike the cache's (a CFG cut-off callback halved the batch),
    `on_shape_change="error"` raises and `"recompute"` recomputes and re-caches. A call
    outside a generation (before any `set_timesteps`, or past its last timestep: a
    denoiser shared with a pipeline whose scheduler is not wrapped) raises, and so does
    one after `pipe.scheduler` was replaced. `self.trace` records, per denoiser call,
    `(generation, step, num_steps, stream, attr, recomputed block indices)`.
    """

    def __init__(self, pipe, schedule: Callable[[int, int], Sequence[bool]],
                 blocks: Sequence[tuple[str, str]] | None = None, on_shape_change: str = "error"):
        if on_shape_change not in ("error", "recompute"):
            raise ValueError(f"on_shape_change must be 'error' or 'recompute', not {on_shape_change!r}")
        self.pipe = pipe
        self.schedule = schedule
        self.on_shape_change = on_shape_change
        self.blocks = list(blocks) if blocks is not None else default_blocks(pipe)
        if not self.blocks:
            raise ValueError("no blocks to cache")
        self.scheduler = pipe.scheduler
        self.generation = 0
        self.num_steps: int | None = None
        self.begin: int | None = None
        self.steps_done = 0
        self.calls_since_step = 0
        self.current: dict | None = None
        self.caches: dict[tuple[int, int], tuple] = {}
        self.trace: list[tuple] = []
        self._undo: list[Callable[[], None]] = []
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    # installation ---------------------------------------------------------------------
    def _patch(self, obj, name: str, make: Callable) -> None:
        had = name in vars(obj)
        previous = vars(obj).get(name)
        original = getattr(obj, name)
        wrapped = functools.wraps(original)(make(original))  # keeps inspect.signature(...) right
        setattr(obj, name, wrapped)

        def undo():
            if had:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)

        self._undo.append(undo)

    def _install(self) -> None:
        sched = self.scheduler
        self._infer_begin = not hasattr(type(sched), "set_begin_index")

        def set_timesteps(original):
            def wrapped(*args, **kwargs):
                result = original(*args, **kwargs)
                self.generation += 1
                self.num_steps = len(sched.timesteps)
                self.begin = None
                self.steps_done = 0
                self.calls_since_step = 0
                self.caches.clear()
                return result
            return wrapped

        def set_begin_index(original):
            def wrapped(begin_index: int = 0):
                result = original(begin_index)
                self.begin = int(begin_index)
                return result
            return wrapped

        def step(original):
            def wrapped(*args, **kwargs):
                result = original(*args, **kwargs)
                self.steps_done += 1
                self.calls_since_step = 0
                return result
            return wrapped

        self._patch(sched, "set_timesteps", set_timesteps)
        if hasattr(sched, "set_begin_index"):
            self._patch(sched, "set_begin_index", set_begin_index)
        self._patch(sched, "step", step)

        for attr in sorted({a for a, _ in self.blocks}):
            model = getattr(self.pipe, attr)
            pre = model.register_forward_pre_hook(functools.partial(self._enter, attr), with_kwargs=True)
            post = model.register_forward_hook(self._exit, always_call=True)
            self._undo += [pre.remove, post.remove]
        for index, (attr, name) in enumerate(self.blocks):
            module = getattr(self.pipe, attr).get_submodule(name)
            self._patch(module, "forward", functools.partial(self._block, index))

    def remove(self) -> None:
        """Undo every wrapper and hook (latest first)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # step identity ----------------------------------------------------------------------
    def _enter(self, attr, module, args, kwargs):
        if self.pipe.scheduler is not self.scheduler:
            raise RuntimeError("pipe.scheduler was replaced after the reference was installed")
        if self.num_steps is None:
            raise RuntimeError("denoiser called before any scheduler.set_timesteps")
        if self.begin is None:
            self.begin = self._begin_from_timestep(args, kwargs) if self._infer_begin else 0
        step = self.begin + self.steps_done
        if step >= self.num_steps:
            raise RuntimeError(f"denoiser call at step {step} of a {self.num_steps}-step generation: is it driven "
                               f"by a scheduler the reference did not wrap (from_pipe(..., scheduler=...))?")
        stream = self.calls_since_step
        self.calls_since_step += 1
        row = [bool(v) for v in self.schedule(step, self.num_steps)]
        if len(row) != len(self.blocks):
            raise ValueError(f"schedule row has {len(row)} entries for {len(self.blocks)} blocks")
        self.current = {"step": step, "stream": stream, "row": row, "recomputed": []}
        self.trace.append((self.generation, step, self.num_steps, stream, attr, self.current["recomputed"]))

    def _exit(self, module, args, kwargs_or_output, output=None):
        self.current = None

    def _begin_from_timestep(self, args, kwargs) -> int:
        # Schedulers without set_begin_index (DDIM, DDPM, PNDM) are only driven by UNet
        # pipelines, which pass the loop's `t` itself: a view into scheduler.timesteps, so
        # its storage offset is its position (exact even where PNDM repeats a timestep).
        # Otherwise: the first position holding the same value.
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        ts = self.scheduler.timesteps
        if (isinstance(t, torch.Tensor) and t.dim() == 0 and ts.dim() == 1
                and t.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
            return (t.storage_offset() - ts.storage_offset()) // ts.stride(0)
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        hits = (ts.to(t.device) == t.reshape(-1)[0]).nonzero()
        if len(hits) == 0:
            raise RuntimeError("cannot place the first timestep in scheduler.timesteps")
        return int(hits[0, 0])

    # caching ----------------------------------------------------------------------------
    def _block(self, index: int, forward):
        def wrapped(*args, **kwargs):
            cur = self.current
            if cur is None:  # called outside a denoiser call: plain
                return forward(*args, **kwargs)
            key = (cur["stream"], index)
            streams = stream_inputs(forward, args, kwargs)
            shapes = [tuple(x.shape) for x in streams]
            entry = self.caches.get(key)
            if not cur["row"][index] and entry is not None and entry[0] != shapes:  # would reuse a misfit
                if self.on_shape_change == "error":
                    raise RuntimeError(f"block {self.blocks[index]}, stream {cur['stream']}: input shapes changed "
                                       f"within a generation ({entry[0]} -> {shapes})")
                entry = None
            if cur["row"][index] or entry is None:
                out = forward(*args, **kwargs)
                leaves, spec = pytree.tree_flatten(out)
                bases = residual_bases(leaves, streams)
                cached = [None if not isinstance(v, torch.Tensor)
                          else (v - streams[b] if b is not None else v.clone()).detach()
                          for v, b in zip(leaves, bases)]
                consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
                self.caches[key] = (shapes, spec, consts, bases, cached)
                cur["recomputed"].append(index)
                return out
            _shapes, spec, consts, bases, cached = entry
            leaves = list(consts)
            for j, (c, b) in enumerate(zip(cached, bases)):
                if c is not None:
                    leaves[j] = streams[b] + c if b is not None else c.clone()
            return pytree.tree_unflatten(leaves, spec)

        return wrapped


# -- callbacks that end a generation early --------------------------------------------
def interrupt_at(step):
    """A ``callback_on_step_end`` that sets ``pipe._interrupt`` at ``step``."""
    def callback(pipe, i, t, kwargs):
        if i == step:
            pipe._interrupt = True
        return {}
    return callback


def raise_at(step):
    """A ``callback_on_step_end`` that raises at ``step``."""
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise RuntimeError("callback failed")
        return {}
    return callback
