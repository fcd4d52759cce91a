"""Diffusion-101: class-conditioned diffusion on MNIST from scratch: DDPM and flow matching, a
UNet with cross-attention or a transformer, LoRA, fast samplers and a distilled student.

The Python API is load() and sample() (diffusion101/api.py); the commands are in scripts/.

The API is imported on first use (PEP 562's module __getattr__), not here: importing the
package must stay light, so that the commands' entry points (entry.py) start their one-line
error boundary before torch is imported."""
__all__ = ["Pipeline", "load", "sample"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'diffusion101' has no attribute {name!r}")
