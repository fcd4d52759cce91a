"""Diffusion-101: a class-conditioned DDPM on MNIST with cross-attention and LoRA, from scratch."""
__version__ = "0.1.0"
