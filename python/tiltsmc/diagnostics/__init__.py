"""Diagnostics: the Bellman error of a reward model, measured from rollouts of the base policy."""

from .bellman import BellmanEstimate, bellman_error

__all__ = ["BellmanEstimate", "bellman_error"]
