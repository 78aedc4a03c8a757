"""sftlab: supervised fine-tuning that records what a model learns and what it forgets."""

__version__ = "0.1.0"
