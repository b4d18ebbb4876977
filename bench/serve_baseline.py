"""What a user serves today: a FastAPI app whose handler calls ``tiltsmc.smc`` once per request.

The reference of ``bench_serve.py``. One model pair loaded at start and shared by every request; the
handler is a plain ``def``, so FastAPI runs it in its thread pool (up to 40 requests at once, each its own
``tiltsmc.smc`` call of one prompt: two session calls per step per request). The request and the response
have the shape of ``tiltsmc serve``'s ``POST /v1/completions`` (OpenAI completions plus a ``tiltsmc``
object with the log Z estimate, the weights, the ESS trace and the compute), so that both servers do the
same HTTP and JSON work.

``--engine`` serves the same app with the handler awaiting ``tiltsmc.Engine.generate`` instead (and
``GET /stats``, the engine's ``stats()`` as JSON): a control for the HTTP layer, and what
``bench_serve.py --engine-server app`` starts.

    python bench/serve_baseline.py --models demo --port 8001        # or --models fixtures
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import tiltsmc
from pydantic import BaseModel, Field
from tiltsmc import core

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
FIXTURE_MAX_NEW_TOKENS = 16


class CompletionRequest(BaseModel):
    """The fields of ``tiltsmc serve``'s request that the benchmark sends."""

    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = Field(default=None, ge=0)
    sampler: str = "smc"
    particles: int = Field(default=16, ge=1)


def load_models(models: str, memory_arena: bool = True, threads: Optional[int] = None) -> tuple[Any, Any]:
    """The policy and reward model of a configuration: ``demo`` (the bundled arithmetic models, as
    ``tiltsmc serve --demo`` loads them) or ``fixtures`` (gpt2-tiny, prm-tiny read as a logit), with
    ONNX Runtime's CPU memory arena on (its default) or off, and ``threads`` intra-op threads a session
    (None: ONNX Runtime's default, one per core)."""
    if models == "demo":
        from tiltsmc.tasks import arithmetic

        return arithmetic.load_models(memory_arena=memory_arena, intra_op_num_threads=threads)
    if models == "fixtures":
        from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

        policy = OnnxCausalLM(
            FIXTURES / "gpt2-tiny",
            max_new_tokens=FIXTURE_MAX_NEW_TOKENS,
            memory_arena=memory_arena,
            intra_op_num_threads=threads,
        )
        reward = OnnxRewardModel(
            FIXTURES / "prm-tiny", kind="logit", memory_arena=memory_arena, intra_op_num_threads=threads
        )
        return policy, reward
    raise ValueError(f"models: expected demo or fixtures, got {models!r}")


def _response(result: Any, seed: Optional[int], policy: Any, prompt: str, sampler: str) -> dict[str, Any]:
    """The OpenAI-shaped body: one particle drawn by weight, as ``tiltsmc serve`` answers."""
    record = result.to_dict()
    weights = np.asarray(result.log_weights[0])
    index = 0
    if len(weights) > 1 and not result.collapsed[0]:
        index = int(core.pool_select(weights, rng=np.random.default_rng([seed or 0, 1]))[0])
    tokens = np.asarray(result.samples[0][index])
    text = result.texts[0][index] if result.texts else ""
    eos = getattr(policy, "eos_token_ids", frozenset())
    prompt_tokens = len(policy.encode_prompt(prompt))
    detail = {key: record[key][0] for key in ("log_z", "log_weights", "ess", "resampled", "collapsed")}
    detail.update(index=0, prompt_index=0, sample_index=index, compute=record["compute"])
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": "tiltsmc",
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "stop" if tokens.size and int(tokens[-1]) in eos else "length",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": int(tokens.size),
            "total_tokens": prompt_tokens + int(tokens.size),
        },
        "tiltsmc": {"sampler": sampler, "choices": [detail]},
    }


def create_app(
    models: str, engine: bool = False, memory_arena: bool = True, threads: Optional[int] = None
) -> Any:
    from fastapi import FastAPI

    policy, reward = load_models(models, memory_arena=memory_arena, threads=threads)

    def options(body: CompletionRequest) -> tuple[str, dict[str, Any]]:
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        return prompt, {"num_particles": body.particles, "max_new_tokens": body.max_tokens}

    server_engine = tiltsmc.Engine(policy, reward) if engine else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if server_engine is not None:
            server_engine.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    if server_engine is None:

        @app.post("/v1/completions")
        def completions(body: CompletionRequest) -> dict[str, Any]:
            prompt, kwargs = options(body)
            result = tiltsmc.smc(policy, reward, prompts=[prompt], rng=body.seed, **kwargs)
            return _response(result, body.seed, policy, prompt, "smc")

        return app

    @app.post("/v1/completions")
    async def generate(body: CompletionRequest) -> dict[str, Any]:
        prompt, kwargs = options(body)
        result = await server_engine.generate(prompt, "smc", rng=body.seed, **kwargs)
        return _response(result, body.seed, policy, prompt, "smc")

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return server_engine.stats()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("demo", "fixtures"), default="demo")
    parser.add_argument("--engine", action="store_true", help="await tiltsmc.Engine.generate instead")
    parser.add_argument(
        "--memory-arena", choices=("on", "off"), default="on", help="ONNX Runtime's CPU arena"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime threads a session (default: one a core)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8001")))
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        create_app(
            args.models, engine=args.engine, memory_arena=args.memory_arena == "on", threads=args.threads
        ),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
