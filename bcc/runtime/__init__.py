"""runtime: the module users call (:mod:`bcc.runtime.module`), the one trajectory stepper every
lowering runs in (:mod:`bcc.runtime.stepper`: steps, streams, caches), diffusers pipelines whose
scheduler says each denoiser call's step (:mod:`bcc.runtime.pipeline`) and the plain hook
reference the tests compare against (:mod:`bcc.runtime.reference`)."""
