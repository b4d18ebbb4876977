"""Diagnostics: the Bellman error of a reward model, measured from rollouts of the base policy
([`bellman_error`][tiltsmc.diagnostics.bellman_error]) or read online from the log Z increments of any
sampler's run
([`online_bellman`][tiltsmc.diagnostics.online_bellman])."""

from .bellman import BellmanEstimate, bellman_error
from .online import OnlineBellman, OnlineBellmanWarning, online_bellman

__all__ = ["BellmanEstimate", "OnlineBellman", "OnlineBellmanWarning", "bellman_error", "online_bellman"]
