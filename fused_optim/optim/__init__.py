"""Drop-in optimizer classes."""

from ._base import TORCH_OPTIM
from .adam import Adam, AdamW
from .sgd import SGD

__all__ = ["SGD", "TORCH_OPTIM", "Adam", "AdamW"]
