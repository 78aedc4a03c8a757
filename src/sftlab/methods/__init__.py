"""Fine-tuning methods. Importing this package registers every built-in method (torch-free)."""

from . import boft, full, ia3, lora, oft, prefix, prompt  # noqa: F401  (registration side effects)
from .base import METHODS, PRESETS, Method, Preset, default_lr, register_method, register_preset, resolve
from .budget_rules import BudgetRule
from .merge import ADDITIVE, ROTATION, AdditiveMerge, RotationMerge

__all__ = ["ADDITIVE", "ROTATION", "AdditiveMerge", "BudgetRule", "METHODS", "Method", "PRESETS", "Preset",
           "RotationMerge", "default_lr", "register_method", "register_preset", "resolve"]
