"""Golden runners: vae."""
