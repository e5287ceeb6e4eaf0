"""The forgetting run: trainer, losses, inversion, closed form, baselines, options."""
