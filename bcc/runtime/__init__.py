"""runtime: the module users call (:mod:`bcc.runtime.module`), diffusers pipelines whose
scheduler says each denoiser call's step (:mod:`bcc.runtime.pipeline`) and the plain hook
reference the tests compare against (:mod:`bcc.runtime.reference`). Each runs its lowered
programs in the one trajectory stepper (:mod:`bcc.lower.stepper`)."""
