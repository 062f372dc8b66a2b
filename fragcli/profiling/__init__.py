"""Per-head and per-block profiling of a diffusers denoiser."""
