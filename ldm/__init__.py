"""Latent diffusion library: configs, models, diffusion maths, data and text conditioning."""
