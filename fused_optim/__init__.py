"""fused_optim: torch.optim's SGD, Adam and AdamW, with the whole update in one fused pass."""

from .backends import BackendUnavailableError, available_backends
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["SGD", "Adam", "AdamW", "BackendUnavailableError", "available_backends"]
