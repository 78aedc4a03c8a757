"""Fine-tuning methods. Importing this package registers every built-in method (torch-free)."""

from . import boft, full, ia3, lora, oft, prefix, prompt  # noqa: F401  (registration side effects)
from .base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
