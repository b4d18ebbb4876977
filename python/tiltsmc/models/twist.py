r"""A token-level twist head in the policy's graph: ``Vh`` of every one-token extension, one session run.

An ONNX decoder with a KV cache whose graph has, besides ``logits``, an output of vocabulary size per
position, ``(batch, seq, vocab)``, loaded as ``OnnxCausalLM(path, value_output="twist")``: its row ``s``
at a prefix's last token scores every one-token extension of that prefix (the twist of twisted SMC),
fetched with the logits in the run that feeds the prefix's last token. ``PolicyTwist`` reads it as a
``TwistModel``, so ``tiltsmc.smc(..., proposal="optimal")`` (``q(v) ∝ p(v | x) Vh(x v)``) and exact
``tiltsmc.sp_gsmc(..., pool_size=None)`` run on the ONNX model. ``kind`` reads each score as
``tiltsmc.models.joint.PolicyValue`` does: ``log Vh = s`` (``"log_value"``), ``log s`` (``"prob"``) or
``log sigmoid(s)`` (``"logit"``).

- ``next_log_values(x) = log Vh(x v)`` for every ``v``: the row at ``x``'s last token.
- ``log_value(x v) := next_log_values(x)[v]``: the value of a prefix is its parent's row at the token
  chosen, kept from the step that appended it (the head never scores a prefix from its own last position),
  so the two agree by construction and a resampled particle carries its value along.
- ``initial_log_value`` (no parent): ``log Vh_0 = log sum_v p(v | prompt) Vh(prompt v)``, the one-step
  Bellman value of the prompt under the policy's sampled law (its filters included); the sampler's first
  increment is then 1. Any ``Vh_0 > 0`` leaves the estimate of ``Z`` unbiased; this one is the natural one.
- Finished trajectories: ``Vh_T = r``. Without a verifier the twist itself is the terminal reward
  (``r(x v) = Vh(x v)`` at an EOS token or the last allowed token). With a
  ``verifier(prompt, text) -> r >= 0`` (``tiltsmc.models.onnx_reward.verified_log_reward``),
  ``log_value`` of a finished trajectory is ``log r``,
  and so is ``next_log_values`` at every extension that ends the trajectory (an EOS token; every token at
  the length limit): the optimal proposal then targets ``p(x) r(x)`` exactly. That costs one verifier
  call per ending extension (``vocab`` calls per particle at the length limit). A policy with ``stop``
  strings is refused with a verifier (ValueError): a token that completes a stop string ends the
  trajectory too, and telling which tokens do would decode every token of the vocabulary after every
  particle's text at every step (about 0.2 s a particle for a vocabulary of 49,152), so its extension
  would keep the twist where ``log_value`` gives ``log r``. A ``verifier`` that is not
  callable is refused (TypeError naming it), and so is a reward that is not a real number (a string, None:
  TypeError naming ``verifier``; ``True`` / ``False`` read as 1 / 0) or not finite and ``>= 0``
  (ValueError).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from .._numeric import logsumexp
from .joint import PolicyHead
from .onnx_lm import OnnxCausalLM
from .onnx_reward import verified_log_reward
from .particles import MAX_NEW_TOKENS, Particles

__all__ = ["PolicyTwist"]

FloatArray = npt.NDArray[np.float64]


class PolicyTwist(PolicyHead):
    """``log Vh`` of every one-token extension from the twist head of the policy's own graph (see the
    module docstring)."""

    head = "twist head"

    def __init__(
        self,
        policy: OnnxCausalLM,
        kind: Literal["log_value", "prob", "logit"] = "logit",
        *,
        verifier: Optional[Callable[[Any, str], float]] = None,
    ) -> None:
        if not isinstance(policy, OnnxCausalLM) or policy.value_output is None or not policy.twist_head:
            raise ValueError(
                "policy: expected an OnnxCausalLM loaded with value_output= naming a twist head "
                "(batch, seq, vocab)"
            )
        if not policy.token_level:
            raise ValueError(
                "policy: a twist head scores one-token extensions; load the policy with step='token'"
            )
        super().__init__(policy, kind, verifier)
        if verifier is not None and policy.stop:
            raise ValueError(
                "verifier: a PolicyTwist with a verifier scores each extension that ends a trajectory by "
                f"it, and a token completing one of the policy's stop strings {list(policy.stop)} would end "
                "it too, which only decoding every token of the vocabulary at every step would tell: load "
                "the policy without stop= (its trajectories then end at an EOS token), or drop the verifier "
                "(the twist is then the terminal reward)"
            )
        self.vocab_size = policy.vocab_size

    def next_log_values(self, particles: Particles) -> FloatArray:
        """``log Vh(x v)`` for every token ``v``, ``(B, N, vocab)``: the twist row at ``x``'s last token;
        with a verifier, ``log r(x v)`` where ``x v`` ends the trajectory."""
        particles.flush()
        values = self._log_values(particles.state["lm.value"])
        if self.verifier is not None:
            for b, i in zip(*np.nonzero(~particles.finished)):
                ending, log_r = self._ending_log_rewards(particles, int(b), int(i))
                values[b, i, ending] = log_r
        return values

    def initial_log_value(self, particles: Particles) -> FloatArray:
        """``log Vh_0 = log sum_v p(v | prompt) Vh(prompt v)`` at each prompt, ``(B,)``: read at its first
        particle (all of a prompt's particles start alike), so a verifier runs for one particle a prompt."""
        particles.flush()
        prompts = np.arange(particles.num_prompts)
        return self._first_log_values(particles, prompts, np.zeros_like(prompts))

    def log_value(self, particles: Particles) -> FloatArray:
        """``log Vh`` of every prefix: its parent's twist row at its last token (``log Vh_0`` for an
        empty one, read at the prompt's first empty particle), or the verifier's ``log r`` once finished."""
        particles.flush()
        chosen = particles.state["lm.value.chosen"]
        empty = particles.lengths == 0
        scores = np.where(empty, 0.0, chosen)
        values = self._log_values(scores)
        prompts = np.flatnonzero(empty.any(axis=1))
        if prompts.size:  # only those prompts: a verifier runs for no other
            first = self._first_log_values(particles, prompts, np.argmax(empty[prompts], axis=1))
            values[prompts] = np.where(empty[prompts], first[:, None], values[prompts])
        return self._verified(particles, values, particles.finished & ~empty)

    def _first_log_values(
        self, particles: Particles, prompts: npt.NDArray[np.int64], columns: npt.NDArray[np.int64]
    ) -> FloatArray:
        """``log Vh_0`` of particle ``(prompts[k], columns[k])`` as an empty prefix, ``(K,)``: what
        ``next_log_values`` gives at it (the verifier run for it alone), summed under the policy's law."""
        log_p = np.asarray(self.policy.next_log_probs(particles), dtype=np.float64)[prompts, columns]
        values = self._log_values(particles.state["lm.value"][prompts, columns])
        if self.verifier is not None:
            for k in np.flatnonzero(~particles.finished[prompts, columns]):
                ending, log_r = self._ending_log_rewards(particles, int(prompts[k]), int(columns[k]))
                values[k, ending] = log_r
        return logsumexp(log_p + values)

    def _ending_log_rewards(
        self, particles: Particles, b: int, i: int
    ) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """The tokens whose extension ends unfinished particle ``(b, i)`` (an EOS token; every token at its
        length limit) and the verifier's ``log r`` of each extension."""
        length = int(particles.lengths[b, i])
        extra = particles.state.get(MAX_NEW_TOKENS)
        at_limit = length + 1 >= self.policy.max_new_tokens or (
            extra is not None and length + 1 >= int(np.asarray(extra)[b, i])
        )
        ending = (
            np.arange(self.vocab_size)
            if at_limit
            else np.array(sorted(self.policy.eos_token_ids), dtype=np.int64)
        )
        log_r = np.array([self._verify_extension(particles, b, i, int(v)) for v in ending], dtype=np.float64)
        return ending, log_r

    def _verify_extension(self, particles: Particles, b: int, i: int, token: int) -> float:
        """``log r`` of particle ``(b, i)`` extended by ``token``: written into its next slot, verified,
        and the slot restored (its length too), so the particle is unchanged."""
        assert self.verifier is not None
        length = int(particles.lengths[b, i])
        slot = particles.tokens[b, i, length]
        particles.tokens[b, i, length] = token
        particles.lengths[b, i] = length + 1
        try:
            return verified_log_reward(self.verifier, particles.text_decoder, particles, b, i)
        finally:
            particles.tokens[b, i, length] = slot
            particles.lengths[b, i] = length
