"""Golden runners: diffusion."""
