r"""One graph as policy and reward: ``logits`` and a value head read from the same session run.

An ONNX decoder with a KV cache whose graph also has a value output, one score per position
(``(batch, seq)`` or ``(batch, seq, 1)``: e.g. a process reward head on the policy's own trunk), loaded
as ``OnnxCausalLM(path, value_output="value")``, fetches that output with the logits at every run. The
run that feeds a particle's new token gives both the next-token law ``p(. | prefix)`` and the score
``s`` of the prefix that token ends, so ``PolicyValue`` reads ``log Vh(prefix)`` from the policy's
state (``Particles.state["lm.value"]``) without a second model: one trunk per step. ``kind`` reads ``s``
as with ``tiltsmc.models.onnx_reward.OnnxRewardModel``: ``log Vh = s`` (``"log_value"``),
``log s`` (``"prob"``) or ``log sigmoid(s)`` (``"logit"``), at the prefix's last token; on finished
trajectories a ``verifier(prompt, text) -> r >= 0`` gives the terminal reward where one is given (``text``:
the policy's ``decode``, as the results report it, ending before its stop strings). The
values equal those of the same graph loaded as an ``OnnxRewardModel(path, output=...)`` (tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from .. import core
from .onnx_lm import OnnxCausalLM
from .onnx_reward import check_verifier, verified_log_reward
from .particles import Particles

__all__ = ["PolicyHead", "PolicyValue"]

FloatArray = npt.NDArray[np.float64]


class PolicyHead:
    """What ``PolicyValue`` and ``tiltsmc.models.twist.PolicyTwist`` share: a reward read from an output of
    the policy's own graph (``head``: what that output is, for messages), ``kind`` as in
    ``OnnxRewardModel``, and the verifier's ``log r`` on finished trajectories, each verified once (of the
    policy's text, which the particles carry as ``Particles.text_decoder``; their token ids where it has no
    tokenizer)."""

    log_values_checked = True  # read_log_values refuses NaN and +inf
    supports_engine = True  # its state is the policy's, which the engine joins and trims
    _serial_numbers = itertools.count()
    head = "value head"

    def __init__(
        self,
        policy: OnnxCausalLM,
        kind: Literal["log_value", "prob", "logit"],
        verifier: Optional[Callable[[Any, str], float]],
    ) -> None:
        if kind not in core.SCORE_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(core.SCORE_KINDS)}, got {kind!r}")
        self.policy = policy
        self.kind = kind
        check_verifier(verifier)
        self.verifier = verifier
        self.tokenizer = policy.tokenizer
        self._verified_key = f"head.{next(self._serial_numbers)}.verified"

    def check_policy(self, policy: Any) -> None:
        """It reads the state of the policy it was built on: refuse any other."""
        if policy is not self.policy:
            raise ValueError(
                f"reward: a {type(self).__name__} reads its own policy's {self.head}; pass that policy"
            )

    def _log_values(self, scores: np.ndarray) -> FloatArray:
        flat = np.ascontiguousarray(scores, dtype=np.float64).reshape(-1)
        try:
            values = core.read_log_values(flat, flat.size, None, self.kind)
        except ValueError as error:
            raise ValueError(f"reward: {self.policy.model_file.name}'s {self.head}: {error}") from error
        return values.reshape(scores.shape)

    def _verified(self, particles: Particles, values: FloatArray, ended: npt.NDArray[np.bool_]) -> FloatArray:
        """``values`` with the verifier's ``log r`` where ``ended``; each trajectory is verified once, and
        its ``log r`` follows resampling in the state."""
        if self.verifier is None or not ended.any():
            return values
        verified = particles.state.get(self._verified_key)
        if verified is None:
            verified = particles.state[self._verified_key] = np.full(particles.lengths.shape, np.nan)
        for b, i in zip(*np.nonzero(ended & np.isnan(verified))):
            verified[b, i] = verified_log_reward(
                self.verifier, particles.text_decoder, particles, int(b), int(i)
            )
        return np.where(ended, verified, values)


class PolicyValue(PolicyHead):
    """``log Vh`` from the value output of the policy's own graph (see the module docstring)."""

    def __init__(
        self,
        policy: OnnxCausalLM,
        kind: Literal["log_value", "prob", "logit"] = "logit",
        *,
        verifier: Optional[Callable[[Any, str], float]] = None,
    ) -> None:
        if not isinstance(policy, OnnxCausalLM) or policy.value_output is None:
            raise ValueError("policy: expected an OnnxCausalLM loaded with value_output= (its value head)")
        if policy.twist_head:
            raise ValueError(
                "policy: its value_output is a twist head (batch, seq, vocab); read it with "
                "tiltsmc.models.twist.PolicyTwist"
            )
        super().__init__(policy, kind, verifier)

    def initial_log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_0``: the value at each prompt's last token (the policy's start ran it)."""
        particles.flush()
        return self._log_values(particles.state["lm.value"][:, 0])

    def log_value(self, particles: Particles) -> FloatArray:
        """``log Vh`` of every prefix: the value head at its last token (the run that fed it is the one
        that gives the next token's law), or the verifier's ``log r`` once finished."""
        particles.flush()
        values = self._log_values(particles.state["lm.value"])
        return self._verified(particles, values, particles.finished)
