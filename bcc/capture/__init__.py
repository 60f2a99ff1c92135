"""capture: torch.export a denoiser into a flat ATen graph (:mod:`bcc.capture.graph`), the
input signature a capture is tied to (:mod:`bcc.capture.signature`) and the one rule for
finding a call's timestep (:mod:`bcc.capture.timestep`)."""
