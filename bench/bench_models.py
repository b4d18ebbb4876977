"""Benchmark of SMC on the ONNX fixture models: where a step's time goes, and what the KV cache saves.

For each decoder fixture (with prm-tiny as the reward model), one seeded SMC run of ``--prompts`` prompts
x ``--particles`` particles for ``--tokens`` tokens (after one untimed run of the same), timed so:

* ONNX Runtime: the time inside ``session.run`` / ``run_with_iobinding`` of the policy and the reward
  model (the models themselves);
* tiltsmc: everything else, split into the models' Python glue (feeds, masks, drawing tokens, building
  reward prefixes) and the rest (the samplers' weights, resampling, reordering particles and caches);
* on the CPU, the same run again with both sessions replaying the outputs they gave (no model runs
  between steps): tiltsmc's time with the CPU's caches warm, beside its time in the real run, where
  the models' work evicts tiltsmc's code and data from the caches at every call;
* the same run with a naive policy that re-encodes every prefix from scratch at each step (no cache, no
  gather), which is what an implementation without cache-following resampling does;
* with ``--provider cuda``, also the run with the KV cache kept on the host (``device_cache=False``:
  ONNX Runtime copies it to the GPU and back at every step) beside the default device cache.

Then the reward model's cost per step against the prefix's length (issue #18), in the same run: particles
grown by the policy 8 tokens a step (up to the context: 128 positions on the fixtures, 256 on the demo's
decoder), each step scored by the KV-cached reward (it runs the 8 new tokens) and by the same graph
re-encoding every prefix (``kv_cache=False``), min of ``--repeats`` passes per step. Rewards: the value head
of ``gpt2-value-tiny``, ``llama-tiny`` read through a class, the demo's decoder read through a class, and
for reference the demo's own PRM (no cache: it always re-encodes). The bar: the cached reward's time per
step grows by less than 10% of re-encoding's growth from the shortest to the longest prefix. Last, the
SMC run above again with the cached reward (``gpt2-value-tiny``) against the same graph re-encoding: whole
step time and tiltsmc's share.

Prints a table and writes JSON to bench/results/models_<host>[_cuda].json. Not a test: figures depend on
the machine; run it on a quiet one (the 2-core VM is shared with other work: hence the min of repeats).
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import tiltsmc
from _machine import machine_info
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel
from tiltsmc.tasks import arithmetic

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
PRM_TINY: tuple[Path, dict[str, Any]] = (FIXTURES / "prm-tiny", {"kind": "logit"})
VALUE_TINY: tuple[Path, dict[str, Any]] = (FIXTURES / "gpt2-value-tiny", {"kind": "logit", "output": "value"})


class SessionTimer:
    """Wraps ``session.run`` and ``session.run_with_iobinding`` of a model to add up the seconds spent
    inside ONNX Runtime (with the CUDA provider, a call returns once the device is done)."""

    def __init__(self, model: Any) -> None:
        self.seconds = 0.0
        self.calls = 0
        for method in ("run", "run_with_iobinding"):
            setattr(model.session, method, self._timed(getattr(model.session, method)))

    def _timed(self, inner: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began
                self.calls += 1

        return timed  # an instance attribute shadows the method


class SessionReplay:
    """Records what ``session.run`` returns in one run, then hands the same outputs back in the same
    order in the next run (once: that run may reorder them in place), without running the model.

    The replayed run follows the recorded one exactly (same seed, same outputs), so its time is
    tiltsmc's alone with the CPU's caches not flushed by the model between steps: the reference for how
    much of tiltsmc's time in a real step is cold caches."""

    def __init__(self, model: Any) -> None:
        self.recorded: list[Any] = []
        self.replaying = False
        self.position = 0
        self._run = model.session.run
        model.session.run = self.run

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if not self.replaying:
            outputs = self._run(*args, **kwargs)
            self.recorded.append([np.array(x, copy=True) for x in outputs])
            return outputs
        outputs = self.recorded[self.position]  # handed back once: tiltsmc may reorder them in place
        self.position += 1
        return outputs

    def replay(self) -> None:
        self.replaying, self.position = True, 0


class RecomputingLM(OnnxCausalLM):
    """The naive policy: each step re-runs the whole prefix without a cache (same law, same draws)."""

    def _advance(self, particles: Any, tokens: Any, active: Any) -> None:
        still, going = self._append_tokens(particles, tokens, active)
        if going == 0:
            return
        batch, count = particles.lengths.shape
        prompts = particles.prompt_tokens
        sequences = [
            np.concatenate([prompts[b], particles.tokens[b, i, : particles.lengths[b, i]]])
            for b in range(batch)
            for i in range(count)
        ]
        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, sequence in enumerate(sequences):  # left padding, as at the start
            ids[row, width - len(sequence) :] = sequence
            mask[row, width - len(sequence) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, _ = self._run(ids, mask, positions, None)
        fresh = np.asarray(logits[:, -1, :], dtype=np.float32).reshape(batch, count, -1)
        particles.state["lm.logits"] = np.where(still[..., None], fresh, particles.state["lm.logits"])


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _gpu_name() -> str:
    """The GPU's name as nvidia-smi gives it ('' where there is none)."""
    import subprocess

    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}


def one_run(
    policy_class: type,
    fixture: str,
    num_prompts: int,
    args: argparse.Namespace,
    device_cache: Any = None,
    replay: bool = False,
    reward_model: tuple[Path, dict[str, Any]] = PRM_TINY,
) -> dict[str, Any]:
    # The previous configuration's sessions sit in reference cycles (the session timers): free them now,
    # or their threads and memory slow this configuration's start and show up as glue time.
    gc.collect()
    providers = PROVIDERS[args.provider]
    policy = policy_class(
        FIXTURES / fixture,
        max_new_tokens=args.tokens,
        eos_token_id=[],
        providers=providers,
        device_cache=device_cache,
    )
    reward = OnnxRewardModel(reward_model[0], **reward_model[1], providers=providers)
    prompts = [f"question {k}: what is {k} + {k + 1}?" for k in range(num_prompts)]
    # Warm-up: the same run once untimed (first calls at each shape allocate, and on CUDA pick kernels).
    run_args = {"num_particles": args.particles, "ess_threshold": args.ess_threshold, "rng": args.seed}
    tiltsmc.smc(policy, reward, prompts, **run_args)
    policy_timer, reward_timer = SessionTimer(policy), SessionTimer(reward)
    began = time.perf_counter()
    result = tiltsmc.smc(policy, reward, prompts, **run_args)
    total = time.perf_counter() - began
    steps = result.ess.shape[1]
    policy_onnx, reward_onnx = policy_timer.seconds, reward_timer.seconds  # before any replay adds to them
    onnx = policy_onnx + reward_onnx
    replay_tiltsmc = None
    if replay and device_cache is None and policy_class is OnnxCausalLM and args.provider == "cpu":
        replays = (SessionReplay(policy), SessionReplay(reward))
        tiltsmc.smc(policy, reward, prompts, **run_args)  # recorded
        for r in replays:
            r.replay()
        began = time.perf_counter()
        replayed = tiltsmc.smc(policy, reward, prompts, **run_args)
        replay_tiltsmc = time.perf_counter() - began
        assert np.array_equal(replayed.log_z, result.log_z), "the replay did not follow the recorded run"
    return {
        "fixture": fixture,
        "reward": reward_model[0].name,
        "reward_kv_cached": reward.kv_cached,
        "prompts": num_prompts,
        "policy": policy_class.__name__,
        "provider": policy.session.get_providers()[0],
        "device_cache": policy.device_cache,
        "steps": steps,
        "resampling_steps": int(result.resampled.sum(axis=1).max()),
        "total_seconds": total,
        "onnx_seconds": onnx,
        "policy_session_seconds": policy_onnx,
        "reward_session_seconds": reward_onnx,
        "tiltsmc_seconds": total - onnx,
        "sampler_bookkeeping_seconds": result.compute.bookkeeping_seconds,
        # tiltsmc's time split: the models' Python glue around their sessions, and the rest (samplers'
        # weights, resampling, reordering the particles and their caches, results)
        "policy_glue_seconds": result.compute.policy_seconds - policy_onnx,
        "reward_glue_seconds": result.compute.reward_seconds - reward_onnx,
        "per_step_ms": 1e3 * total / steps,
        "tiltsmc_share": (total - onnx) / total,
        # the same run with the sessions replayed (no model between steps): tiltsmc alone, caches warm
        "tiltsmc_replayed_seconds": replay_tiltsmc,
        "bookkeeping_share": result.compute.bookkeeping_seconds / total,
        "log_z": result.log_z.tolist(),
    }


# (name, policy folder, reward folder, reward options, pad id, prompts, context): the reward models timed
# against the prefix's length; the policy only grows the particles.
def _growth_configs() -> list[tuple[str, Path, Path, dict[str, Any], int, list[str], int]]:
    plus, newline = 47, arithmetic.VOCAB.index("\n")
    demo = arithmetic.MODELS_DIR
    fixture_prompts = [f"q{k}: {k}+{k + 1}=" for k in range(4)]
    demo_prompts = [p.prompt for p in arithmetic.make_problems(2, 4, rng=0)]
    return [
        ("gpt2-value-tiny value head", FIXTURES / "gpt2-tiny", VALUE_TINY[0], VALUE_TINY[1], 1,
         fixture_prompts, 128),
        ("llama-tiny class head", FIXTURES / "llama-tiny", FIXTURES / "llama-tiny",
         {"kind": "logit", "label": plus}, 1, fixture_prompts, 128),
        ("demo decoder class head", demo / "policy", demo / "policy",
         {"kind": "logit", "label": newline}, arithmetic.PAD_ID, demo_prompts, 256),
        ("demo PRM (no cache)", demo / "policy", demo / "prm", {"kind": "logit"}, arithmetic.PAD_ID,
         demo_prompts, 256),
    ]  # fmt: skip


def reward_growth(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds of ``log_value`` per step against prefix length, cached and re-encoding (see the module
    docstring); the min over ``args.repeats`` passes of the same seeded particles."""
    providers = PROVIDERS[args.provider]
    step = 8
    rows = []
    for name, policy_dir, reward_dir, options, pad, prompts, context in _growth_configs():
        gc.collect()
        longest_prompt = 24  # room left for the prompt
        steps = (context - longest_prompt) // step
        # one ONNX Runtime thread: on a machine shared with other work, a call whose second thread waits
        # for a core takes several times as long, which swamps the growth measured
        threads = {"providers": providers, "intra_op_num_threads": args.growth_threads}
        policy = OnnxCausalLM(
            policy_dir, max_new_tokens=steps * step, eos_token_id=[], pad_token_id=pad, **threads
        )
        models = {
            "cached": OnnxRewardModel(reward_dir, **options, pad_token_id=pad, **threads),
            "re-encoding": OnnxRewardModel(
                reward_dir, **options, pad_token_id=pad, kv_cache=False, **threads
            ),
        }
        times = {key: np.full((args.repeats, steps), np.inf) for key in models if models[key].kv_cached
                 or key == "re-encoding"}  # fmt: skip
        prefix = np.zeros(steps)
        for repeat in range(args.repeats + 1):  # the first pass warms up, untimed
            particles = policy.start(prompts, args.growth_particles)
            rng = np.random.default_rng(args.seed)
            for key in times:
                models[key].initial_log_value(particles)
            for t in range(steps):
                for _ in range(step):
                    policy.propose(particles, rng)
                particles.flush()
                prefix[t] = (
                    np.mean([len(p) for p in particles.prompt_tokens or []]) + particles.lengths.mean()
                )
                values = {}
                for key in times:
                    began = time.perf_counter()
                    values[key] = models[key].log_value(particles)
                    if repeat:
                        times[key][repeat - 1, t] = time.perf_counter() - began
                if len(values) == 2:
                    gap = float(np.max(np.abs(values["cached"] - values["re-encoding"])))
                    assert gap < 1e-3, f"{name}: cached and re-encoded values differ by {gap}"
                particles.reorder(rng.integers(0, args.growth_particles, size=particles.lengths.shape))
        best = {key: t.min(axis=0) for key, t in times.items()}
        row: dict[str, Any] = {
            "reward": name,
            "onnxruntime_threads": args.growth_threads,
            "prompts": len(prompts),
            "particles": args.growth_particles,
            "tokens_per_step": step,
            "prefix_tokens": prefix.tolist(),
            "seconds_per_step": {key: b.tolist() for key, b in best.items()},
            # the least-squares line's rise from the shortest to the longest prefix (one noisy step at
            # either end does not decide it), and the same from the end points alone
            "growth_seconds": {
                key: float(np.polyfit(prefix, b, 1)[0] * (prefix[-1] - prefix[0])) for key, b in best.items()
            },
            "end_to_end_growth_seconds": {key: float(b[-1] - b[0]) for key, b in best.items()},
        }
        if "cached" in best:
            row["cached_growth_over_re_encoding_growth"] = (
                row["growth_seconds"]["cached"] / row["growth_seconds"]["re-encoding"]
            )
        rows.append(row)
    return rows


def demo_step(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's SMC step at T = 16 (its 24 problems x 8 particles, a step one line), with the policy and
    the PRM apart (the PRM re-encoding every prefix) and in one graph (``arithmetic_models/joint``), the two
    alternating, min of ``args.repeats`` runs each."""
    problems = [p.prompt for p in arithmetic.make_problems(16, 24, rng=args.seed)]
    pairs = {
        "separate": arithmetic.load_models(joint=False, providers=PROVIDERS[args.provider]),
        "joint": arithmetic.load_models(joint=True, providers=PROVIDERS[args.provider]),
    }
    seconds: dict[str, list[float]] = {key: [] for key in pairs}
    steps: dict[str, int] = {}
    texts = {}
    for repeat in range(args.repeats + 1):  # the first round warms up, untimed
        for key, (policy, reward) in pairs.items():
            gc.collect()
            began = time.perf_counter()
            result = tiltsmc.smc(policy, reward, problems, num_particles=8, ess_threshold=0.5, rng=args.seed)
            if repeat:
                seconds[key].append(time.perf_counter() - began)
            steps[key], texts[key] = int(result.ess.shape[1]), result.texts
    assert texts["joint"] == texts["separate"], "the joint graph drew other solutions"
    per_step = {key: 1e3 * min(seconds[key]) / steps[key] for key in pairs}
    return {
        "problems": len(problems),
        "steps": 16,
        "particles": 8,
        "seconds": seconds,
        "sampler_steps": steps,
        "ms_per_step": per_step,
        "separate_over_joint": per_step["separate"] / per_step["joint"],
    }


def print_growth(rows: list[dict[str, Any]]) -> None:
    print("\nreward model: ms per step (min of repeats) against the mean prefix length, tokens")
    for row in rows:
        prefix = row["prefix_tokens"]
        picks = sorted({0, len(prefix) // 4, len(prefix) // 2, 3 * len(prefix) // 4, len(prefix) - 1})
        print(f"{row['reward']}  ({row['prompts']} prompts x {row['particles']} particles)")
        print(f"  {'prefix':<12}" + "".join(f"{prefix[k]:>9.0f}" for k in picks))
        for key, seconds in row["seconds_per_step"].items():
            print(f"  {key:<12}" + "".join(f"{1e3 * seconds[k]:9.2f}" for k in picks))
    for row in rows:
        if "cached_growth_over_re_encoding_growth" not in row:
            continue
        ratio = row["cached_growth_over_re_encoding_growth"]
        growth = row["growth_seconds"]
        print(
            f"{'PASS' if ratio < 0.1 else 'FAIL'}  {row['reward']}: cached growth "
            f"{1e3 * growth['cached']:.2f} ms = {100 * ratio:.1f}% of re-encoding's "
            f"{1e3 * growth['re-encoding']:.2f} ms (fitted lines) from {row['prefix_tokens'][0]:.0f} to "
            f"{row['prefix_tokens'][-1]:.0f} tokens (bar < 10%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompts",
        default="4,16",
        help="comma-separated prompt counts: tiltsmc's per-call Python cost is "
        "fixed, so its share shrinks as the batch grows",
    )
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--ess-threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="cpu",
        help="ONNX Runtime provider; with cuda the KV cache stays on the GPU, and a third run keeps it "
        "on the host (ORT copies it each step) for comparison",
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes of the reward-growth part (min)")
    parser.add_argument("--growth-threads", type=int, default=1, help="ONNX Runtime threads, growth part")
    parser.add_argument("--growth-particles", type=int, default=16, help="per prompt, reward-growth part")
    parser.add_argument(
        "--demo-step-only", action="store_true", help="only the demo's step, separate vs joint graph"
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, for a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.particles, args.tokens, args.repeats, args.growth_particles = "2", 16, 8, 1, 4
    if args.demo_step_only:
        record = demo_step(args)
        print(
            f"demo SMC step at T = 16, 24 problems x 8 particles (min of {args.repeats}): policy + PRM apart "
            f"{record['ms_per_step']['separate']:.1f} ms, one graph {record['ms_per_step']['joint']:.1f} ms: "
            f"{record['separate_over_joint']:.2f}x (bar >= 3x)"
        )
        out = Path(args.out) if args.out else Path(__file__).parent / "results" / "demo_step_vm.json"
        machine = machine_info(onnxruntime=_onnxruntime_version(), gpu=_gpu_name())
        out.write_text(json.dumps({"machine": machine, "args": vars(args), "demo_step": record}, indent=1))
        print(f"wrote {out}")
        return
    prompt_counts = [int(k) for k in str(args.prompts).split(",")]
    rows = []
    for fixture, num_prompts in [(f, k) for k in prompt_counts for f in ("gpt2-tiny", "llama-tiny")]:
        cached = one_run(OnnxCausalLM, fixture, num_prompts, args, replay=True)
        naive = one_run(RecomputingLM, fixture, num_prompts, args)
        row = {
            "cached": cached,
            "recompute": naive,
            "recompute_over_cached": naive["total_seconds"] / cached["total_seconds"],
            "policy_recompute_over_cached": naive["policy_session_seconds"]
            / cached["policy_session_seconds"],
        }
        with_cached_reward = one_run(OnnxCausalLM, fixture, num_prompts, args, reward_model=VALUE_TINY)
        re_encoding_reward = one_run(
            OnnxCausalLM,
            fixture,
            num_prompts,
            args,
            reward_model=(VALUE_TINY[0], {**VALUE_TINY[1], "kv_cache": False}),
        )
        row["cached_reward"] = with_cached_reward
        row["re_encoding_reward"] = re_encoding_reward
        row["re_encoding_over_cached_reward"] = (
            re_encoding_reward["total_seconds"] / with_cached_reward["total_seconds"]
        )
        if args.provider == "cuda":
            host = one_run(OnnxCausalLM, fixture, num_prompts, args, device_cache=False)
            row["host_cache"] = host
            row["host_cache_over_device_cache"] = host["total_seconds"] / cached["total_seconds"]
        rows.append(row)
    print(
        f"prompts {args.prompts} x {args.particles} particles, {args.tokens} tokens, "
        f"{PROVIDERS[args.provider][0]}"
    )
    header = (
        f"{'fixture':<11} {'prompts':>7} {'policy':<14} {'ms/step':>8} {'onnx ms':>8} {'tiltsmc ms':>10} "
        f"{'share':>6} {'bookkeeping':>11} {'policy glue':>11} {'reward glue':>11}"
    )
    print(header)
    for row in rows:
        for key in ("cached", "recompute", "host_cache", "cached_reward", "re_encoding_reward"):
            if key not in row:
                continue
            r = row[key]
            print(
                f"{r['fixture']:<11} {r['prompts']:>7} {key:<14} {r['per_step_ms']:8.2f} "
                f"{1e3 * r['onnx_seconds'] / r['steps']:8.2f} "
                f"{1e3 * r['tiltsmc_seconds'] / r['steps']:10.2f} {100 * r['tiltsmc_share']:5.1f}% "
                f"{100 * r['bookkeeping_share']:10.1f}% "
                f"{1e3 * r['policy_glue_seconds'] / r['steps']:8.2f} ms "
                f"{1e3 * r['reward_glue_seconds'] / r['steps']:8.2f} ms"
            )
        replayed = row["cached"]["tiltsmc_replayed_seconds"]
        if replayed is not None:
            steps = row["cached"]["steps"]
            print(
                f"{'':<11} tiltsmc with the sessions replayed (no model between steps, caches warm): "
                f"{1e3 * replayed / steps:.2f} ms a step, against "
                f"{1e3 * row['cached']['tiltsmc_seconds'] / steps:.2f} ms in the real run"
            )
        print(
            f"{'':<11} re-encoding / cached = {row['recompute_over_cached']:.2f}x for the whole step, "
            f"{row['policy_recompute_over_cached']:.2f}x for the policy's ONNX time alone"
        )
        if "host_cache" in row:
            print(f"{'':<11} host cache / device cache = {row['host_cache_over_device_cache']:.2f}x")
        print(
            f"{'':<11} with gpt2-value-tiny as reward: re-encoding / cached reward = "
            f"{row['re_encoding_over_cached_reward']:.2f}x for the whole step"
        )
    for row in rows:
        share = row["cached"]["tiltsmc_share"]
        verdict = "PASS" if share <= 0.05 else "FAIL"
        print(
            f"{verdict}  {row['cached']['fixture']}, {row['cached']['prompts']} prompts x {args.particles}: "
            f"tiltsmc share of a step = {100 * share:.1f}% "
            "(bar <= 5%); "
            f"sampler bookkeeping alone {100 * row['cached']['bookkeeping_share']:.1f}%"
        )
    growth = reward_growth(args)
    print_growth(growth)
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / f"models_{socket.gethostname()}{'' if args.provider == 'cpu' else '_' + args.provider}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info(onnxruntime=_onnxruntime_version(), gpu=_gpu_name()),
                "args": vars(args),
                "rows": rows,
                "reward_growth": growth,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
