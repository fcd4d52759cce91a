"""Diffusion-101: a class-conditioned DDPM on MNIST with cross-attention and LoRA, from scratch.

The Python API is load() and sample() (diffusion101/api.py); the four jobs are scripts/."""
from .api import Model, load, sample

__all__ = ["Model", "load", "sample"]
__version__ = "0.1.0"
