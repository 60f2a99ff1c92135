"""capture: torch.export a denoiser into a flat ATen graph (:mod:`bcc.capture.graph`)."""
