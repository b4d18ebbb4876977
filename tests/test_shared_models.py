"""One model pair shared by threads: each call's particles are its own (ONNX Runtime sessions run
concurrently; the policy's pool of start buffers hands each buffer to one call at a time)."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import tiltsmc
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

FIXTURES = Path(__file__).parent / "fixtures" / "models"


def test_threads_sharing_models_get_their_lone_results() -> None:
    policy = OnnxCausalLM(FIXTURES / "gpt2-tiny", max_new_tokens=6)
    reward = OnnxRewardModel(FIXTURES / "prm-tiny", kind="logit")
    jobs = [(["hello", "a b"][k % 2], 4 + k % 3, k) for k in range(24)]

    def run(job: tuple[str, int, int]) -> tiltsmc.SamplerResult:
        prompt, count, seed = job
        return tiltsmc.smc(policy, reward, prompts=[prompt, prompt[::-1]], num_particles=count, rng=seed)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    for job, result in zip(jobs, together):
        alone = run(job)
        assert result.texts == alone.texts and result.log_z.tolist() == alone.log_z.tolist(), job
