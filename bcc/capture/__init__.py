"""capture: torch.export a denoiser into a flat ATen graph (:mod:`bcc.capture.graph`), the
input signature a capture is tied to (:mod:`bcc.capture.signature`), the Python state it froze
(:mod:`bcc.capture.frozen`), the one rule for finding a call's timestep
(:mod:`bcc.capture.timestep`) and where a call belongs in a pipeline's generation, read from its
scheduler (:mod:`bcc.capture.scheduler`)."""
