"""A real policy that cannot take one kind of prompt, for the tests of a model call that raises for a
batch of several requests or prompts (one of them the cause): ``RefusesPoison`` wraps a policy and raises
for a batch holding a ``Poison`` prompt; ``RefusesText`` wraps an ONNX policy and raises for a batch
holding one text prompt."""

from __future__ import annotations

from typing import Any

from tiltsmc.models.particles import Particles


class Poison(tuple):  # type: ignore[type-arg]
    """An empty prompt (the exact tasks' one prompt) that the models wrapped here treat as bad."""


class RefusesPoison:
    """A real token policy (the exact tasks') whose ``propose`` and ``next_log_probs`` raise for a batch
    holding a :class:`Poison` prompt (a user model's error that one request causes and that fails the
    whole batched call)."""

    token_level = True
    supports_engine = True
    log_probs_checked = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size

    def start(self, prompts: Any, num_particles: int) -> Particles:
        particles: Particles = self.inner.start(prompts, num_particles)
        return particles

    def refuse(self, particles: Particles) -> None:
        if any(isinstance(prompt, Poison) for prompt in particles.prompts):
            raise RuntimeError("this policy cannot take a poisoned prompt")

    def propose(self, particles: Particles, rng: Any) -> Any:
        self.refuse(particles)
        return self.inner.propose(particles, rng)

    def next_log_probs(self, particles: Particles) -> Any:
        self.refuse(particles)
        return self.inner.next_log_probs(particles)

    def append(self, particles: Particles, tokens: Any) -> None:
        self.inner.append(particles, tokens)


class RefusesText(RefusesPoison):
    """``RefusesPoison`` for a real policy of text prompts (an ``OnnxCausalLM``): it raises for a batch
    holding the prompt ``text``, and forwards everything else to the policy (as a user's wrapper would)."""

    def __init__(self, inner: Any, text: str) -> None:
        super().__init__(inner)
        self.text = text

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def refuse(self, particles: Particles) -> None:
        if self.text in particles.prompts:
            raise RuntimeError(f"cannot take {self.text}")
