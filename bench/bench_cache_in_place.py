"""A right-padded policy's decoding steps with its KV cache written in place against the cache copied.

``OnnxCausalLM(cache_in_place=True)`` binds each layer's past and present to one host array that ONNX
Runtime's GroupQueryAttention writes at each row's length; ``cache_in_place=False`` is the same graph
returning every present as a new ``past + 1`` array (a copy of every row's cache at every call). Both run
the same seeded work: ``--prompts`` prompts x ``--particles`` particles of ``--model`` (default: the
``gqa-tiny`` fixture; a graph in ONNX Runtime's GroupQueryAttention layout, as onnxruntime-genai's
builder or ``scripts/make_gqa_llama.py`` writes it), ``--tokens`` tokens each (no EOS), the
particles resampled after every ``--resample-every`` tokens (random ancestors: SMC's reorder moves every
cache, the wider arrays of the in-place side too), in turn for
``--rounds`` rounds (one untimed round first). Per side: the median seconds a run, the time inside the
session's calls, and the ratio copied / in place, measured in the same run. The runs draw the same
tokens (checked: the in-place path is bitwise the copied one). ``--source DIR`` adds a third side, the
optimum export the GQA graph was rewritten from (left-padded, its cache copied by the graph's ``Concat``
at every call), run on the same prompts for as many tokens.

``--serve REQUESTS`` measures serving instead: a graph with a value head (``value``, read by
``PolicyValue`` as a logit; SmolLM2 with ``scripts/train_smollm2_value.py``'s head, rewritten) answers
that many SMC requests of ``--particles`` particles (``--tokens`` tokens, no EOS, seeds 0, 1, ...)
submitted at once to an ``Engine`` (one worker), side by side in turn: wall seconds a round, and from
``Engine.stats()`` the policy's, the value head's and tiltsmc's own seconds (tiltsmc's share of the steps),
and the rows a decoding call. Every side answers the same requests; the in-place and copied sides give the
same texts.

Not a test: the figures depend on the machine (recorded with them). JSON to
``bench/results/cache_in_place_vm.json`` (``--out``)::

    python bench/bench_cache_in_place.py                       # resampled at every token
    python bench/bench_cache_in_place.py --resample-every 8 --out bench/results/cache_in_place_r8_vm.json
    python bench/bench_cache_in_place.py --model /tmp/smollm2-gqa --source /tmp/smollm2 --particles 8 \
        --tokens 64 --resample-every 8 --rounds 3 --out bench/results/cache_in_place_smollm2_vm.json
    python bench/bench_cache_in_place.py --model /tmp/smollm2-value-gqa --source /tmp/smollm2-value \\
        --serve 16 --particles 4 --tokens 24 --out bench/results/cache_in_place_serve_smollm2_vm.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tiltsmc
from _machine import machine_info
from _plot import RESULTS, write_json
from bench_models import SessionTimer
from tiltsmc.models import OnnxCausalLM, PolicyValue

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments as JSON values (paths as text)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def one_run(policy: OnnxCausalLM, args: argparse.Namespace, clock: SessionTimer) -> tuple[float, float, Any]:
    """Seconds of one run, seconds inside session calls, and the tokens drawn."""
    rng = np.random.default_rng(args.seed)
    inside = clock.seconds
    start = time.perf_counter()
    particles = policy.start([args.prompt] * args.prompts, args.particles)
    for token in range(1, args.tokens + 1):
        policy.propose(particles, rng)
        if token % args.resample_every == 0:
            particles.reorder(rng.integers(0, args.particles, size=particles.lengths.shape))
    particles.flush()
    return time.perf_counter() - start, clock.seconds - inside, particles.tokens.copy()


def serve_round(policy: OnnxCausalLM, args: argparse.Namespace) -> tuple[float, dict[str, Any], list[Any]]:
    """Wall seconds of ``--serve`` requests answered by an Engine, its stats, and the texts."""
    reward = PolicyValue(policy, kind="logit")
    with tiltsmc.Engine(policy, reward, workers=1) as engine:
        start = time.perf_counter()
        futures = [
            engine.submit(
                args.prompt, "smc", num_particles=args.particles, rng=seed, max_new_tokens=args.tokens
            )
            for seed in range(args.serve)
        ]
        results = [future.result() for future in futures]
        wall = time.perf_counter() - start
        stats = engine.stats()
    return wall, stats, [result.texts for result in results]


def serve(args: argparse.Namespace, sides: dict[str, OnnxCausalLM]) -> None:
    texts = {side: serve_round(policy, args)[2] for side, policy in sides.items()}  # untimed
    if texts["in_place"] != texts["copied"]:
        raise SystemExit("the in-place and copied sides answered differently")
    rounds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, policy in sides.items():
            wall, stats, _ = serve_round(policy, args)
            steps = stats["step_seconds"]
            rounds[side].append({
                "wall_seconds": wall, "step_seconds": steps, "policy_seconds": stats["policy_seconds"],
                "reward_seconds": stats["reward_seconds"], "tiltsmc_seconds": stats["tiltsmc_seconds"],
                "tiltsmc_share": stats["tiltsmc_seconds"] / steps if steps else 0.0,
                "rows_per_policy_call": stats["rows_per_policy_call"],
            })  # fmt: skip
    summary = {
        side: {key: statistics.median(r[key] for r in figures) for key in figures[0]} | {"rounds": figures}
        for side, figures in rounds.items()
    }
    print(
        f"{args.model.name}: {args.serve} SMC requests of {args.particles} particles, {args.tokens} tokens, "
        f"submitted at once (medians of {args.rounds} rounds)"
    )
    for side, figures in summary.items():
        print(
            f"  {side:9s} {figures['wall_seconds']:.2f} s; policy {figures['policy_seconds']:.2f} s, tiltsmc "
            f"{figures['tiltsmc_seconds']:.3f} s ({100 * figures['tiltsmc_share']:.1f}% of the steps), "
            f"{figures['rows_per_policy_call']:.1f} rows a call"
        )
    ratios = {side: summary[side]["wall_seconds"] / summary["in_place"]["wall_seconds"] for side in summary}
    print("  wall / in place: " + ", ".join(f"{side} {ratio:.2f}x" for side, ratio in ratios.items()))
    record = {
        "benchmark": "cache_in_place_serve",
        "settings": settings(args),
        "sides": summary,
        "wall_over_in_place": ratios,
        "machine": machine_info(),
    }
    write_json(args.out, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=FIXTURES / "gqa-tiny", help="a GroupQueryAttention graph"
    )
    parser.add_argument("--source", type=Path, default=None, help="the optimum export it was rewritten from")
    parser.add_argument("--prompt", default="hi")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100, help="a particle's (the fixture's context: 128)")
    parser.add_argument("--resample-every", type=int, default=1, help="tokens between resamplings")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--serve", type=int, default=0, metavar="REQUESTS", help="serving instead (see above)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_in_place_vm.json")
    args = parser.parse_args()

    head = {"value_output": "value"} if args.serve else {}
    policies = {
        side: OnnxCausalLM(
            args.model, max_new_tokens=args.tokens, eos_token_id=[], cache_in_place=in_place, **head
        )
        for side, in_place in (("in_place", True), ("copied", False))
    }
    assert policies["in_place"].cache_in_place and not policies["copied"].cache_in_place
    if args.source is not None:
        policies["source"] = OnnxCausalLM(args.source, max_new_tokens=args.tokens, eos_token_id=[], **head)
    if args.serve:
        serve(args, policies)
        return
    clocks = {side: SessionTimer(policy) for side, policy in policies.items()}
    tokens = {side: one_run(policy, args, clocks[side])[2] for side, policy in policies.items()}  # untimed
    if not np.array_equal(tokens["in_place"], tokens["copied"]):
        raise SystemExit("the two sides drew different tokens")
    seconds: dict[str, list[float]] = {side: [] for side in policies}
    session: dict[str, list[float]] = {side: [] for side in policies}
    for _ in range(args.rounds):
        for side, policy in policies.items():
            wall, inside, _ = one_run(policy, args, clocks[side])
            seconds[side].append(wall)
            session[side].append(inside)
    rows = args.prompts * args.particles
    summary = {
        side: {
            "median_seconds": statistics.median(seconds[side]),
            "median_session_seconds": statistics.median(session[side]),
            "ms_per_token": 1e3 * statistics.median(seconds[side]) / args.tokens,
            "seconds": seconds[side],
        }
        for side in policies
    }
    copied, in_place = summary["copied"], summary["in_place"]
    ratio = copied["median_seconds"] / in_place["median_seconds"]
    session_ratio = copied["median_session_seconds"] / in_place["median_session_seconds"]
    print(
        f"{args.model.name}, {rows} rows ({args.prompts} x {args.particles}), {args.tokens} tokens, "
        f"resampled every {args.resample_every}"
    )
    for side, figures in summary.items():
        print(
            f"  {side:9s} {figures['median_seconds']:.3f} s a run ({figures['ms_per_token']:.2f} ms a "
            f"token), in session calls {figures['median_session_seconds']:.3f} s"
        )
    print(f"  copied / in place: {ratio:.2f}x a run, {session_ratio:.2f}x inside session calls")
    source_ratio = None
    if "source" in summary:
        source_ratio = summary["source"]["median_seconds"] / in_place["median_seconds"]
        print(f"  source (optimum export) / in place: {source_ratio:.2f}x a run")
    record = {
        "benchmark": "cache_in_place",
        "settings": settings(args),
        "rows": rows,
        "sides": summary,
        "copied_over_in_place": ratio,
        "copied_over_in_place_session": session_ratio,
        "source_over_in_place": source_ratio,
        "machine": machine_info(),
    }
    write_json(args.out, record)


if __name__ == "__main__":
    main()
