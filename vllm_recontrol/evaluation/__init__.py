"""Evaluation: RE-Control against base generation, Best-of-N and prompting."""

from .evaluate import evaluate
from .metrics import diversity

__all__ = ["evaluate", "diversity"]
