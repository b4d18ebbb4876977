"""A long-running engine returns to about its idle memory after a burst (issue #15): when its last
request has left, the models' ONNX Runtime arenas shrink and the freed heap goes back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "models"

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import tiltsmc
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    def rss_mb(field="VmRSS"):  # VmHWM: the peak so far
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    policy = OnnxCausalLM(sys.argv[1] + "/gpt2-tiny", max_new_tokens=12)
    reward = OnnxRewardModel(sys.argv[1] + "/prm-tiny", kind="logit")
    after = 0.3 if sys.argv[2] == "release" else None
    kept = sys.argv[3] == "keep-freed"  # the server's setting: freed memory reused during the burst
    with tiltsmc.Engine(
        policy, reward, max_batch_rows=8192, release_memory_after=after, keep_freed_memory=kept
    ) as engine:
        engine.submit("hi", num_particles=4, rng=0).result()
        time.sleep(0.6)
        idle = rss_mb()
        futures = [engine.submit(p, num_particles=2000, rng=1) for p in ("hello there", "a")]
        [f.result() for f in futures]
        time.sleep(1.0)  # the worker goes idle (and releases after 0.3 s)
        print(idle, rss_mb("VmHWM"), rss_mb())
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status; malloc_trim is glibc's"
)
@pytest.mark.parametrize("heap", ["default", "keep-freed"])
def test_engine_returns_to_idle_memory_after_a_burst(heap: str) -> None:
    def run(mode: str) -> tuple[float, float, float]:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(FIXTURES), mode, heap],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        idle, peak, after = (float(x) for x in out.stdout.split())
        return idle, peak, after

    idle, peak, after = run("release")
    assert peak - idle > 150, (idle, peak, after)  # the burst really grew the process
    assert after - idle < 0.25 * (peak - idle), (idle, peak, after)
    idle, peak, after = run("keep")  # without the release the arena stays at its peak: the check can fail
    assert after - idle > 0.5 * (peak - idle), (idle, peak, after)


@pytest.mark.parametrize("folder", ["gpt2-tiny", "llama-tiny", "gpt2-merged-tiny", "prm-tiny"])
def test_every_fixture_layout_can_shrink_its_arena(folder: str) -> None:
    from tiltsmc.models import OnnxCausalLM, OnnxRewardModel

    model = (
        OnnxRewardModel(FIXTURES / folder, kind="logit")
        if folder == "prm-tiny"
        else OnnxCausalLM(FIXTURES / folder, max_new_tokens=2)
    )
    assert model.release_memory()  # the smallest input of each exported layout runs


REUSE_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from tiltsmc.serving._memory import reuse_freed_memory

    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    size, count = 2 << 20, 8  # a step's arrays: a KV cache's layers, say
    for _ in range(3):  # allocated, touched and freed
        arrays = [np.ones(size, np.uint8) for _ in range(count)]
        del arrays
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(size, np.uint8) for _ in range(count)]  # again: fresh pages, or the freed ones
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size * count // 4096)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; reads getrusage")
def test_freed_memory_is_reused_instead_of_mapped_afresh() -> None:
    """With reuse_freed_memory (the server's engine: keep_freed_memory=True) large arrays freed and
    allocated again reuse the heap's pages; without it glibc gives them back and maps fresh ones, each a page
    fault on first touch."""

    def faults(mode: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", REUSE_SCRIPT, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        counted, pages = (int(x) for x in out.stdout.split())
        return counted, pages

    counted, pages = faults("reuse")
    assert counted < 0.1 * pages, (counted, pages)
    counted, pages = faults("default")  # glibc's default: the check can fail
    assert counted > 0.5 * pages, (counted, pages)
