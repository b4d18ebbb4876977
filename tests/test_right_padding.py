"""Right-padded batches (``padding_side="right"``): a decoder whose attention reads each row's length from
its mask, ``gqa-tiny`` (ONNX Runtime's GroupQueryAttention fed ``seqlens_k = sum(mask) - 1``, as
onnxruntime-genai's model builder writes it).

The reference for every check is the graph itself run on one row without padding or cache: a sequence's
``log p`` is the sum, over its generated tokens, of ``log softmax(logits)`` of the whole prompt-plus-tokens
run in one session call. The policy's cached, padded, resampled, joined and trimmed batches must give each
particle that law (to float32 rounding)."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort
import pytest
import tiltsmc
from tiltsmc import cli
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, Particles, PolicyValue, onnx_lm
from tiltsmc.models import particles as particles_module
from tiltsmc.models._ort import picks_cuda, runtime_version
from tiltsmc.samplers._engine import Models
from tiltsmc.samplers.lane import Lane, run_alone
from tiltsmc.samplers.result import Compute, SamplerResult
from tiltsmc.samplers.sequential import smc_run
from tiltsmc.tasks import arithmetic

FIXTURES = Path(__file__).parent / "fixtures" / "models"
GQA, GQA_VALUE, PRM = FIXTURES / "gqa-tiny", FIXTURES / "gqa-value-tiny", FIXTURES / "prm-tiny"
PROMPTS = ["a", "hello there", "the quick brown fox", "ok"]
SPACE = 39  # the fixtures' tokenizer: one token per character
ENDS = [3, 4, 5, 6, 7, 8]


class AloneReference:
    """``log p`` of generated tokens after a prompt: one session call over the whole unpadded sequence."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        self.pasts = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def run(self, output: str, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        ids = np.concatenate([prompt, tokens]).astype(np.int64)[None]
        feeds: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
        }
        feeds.update((name, np.zeros((1, 2, 0, 16), np.float32)) for name in self.pasts)
        return np.asarray(self.session.run([output], feeds)[0][0], dtype=np.float64)

    def value(self, prompt: np.ndarray, tokens: np.ndarray) -> float:
        """The value head at the sequence's last token."""
        return float(self.run("value", prompt, tokens)[-1, 0])

    def log_probs(self, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        scores = self.run("logits", prompt, tokens)[len(prompt) - 1 : len(prompt) + len(tokens) - 1]
        log_softmax = scores - scores.max(axis=1, keepdims=True)
        log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
        return log_softmax[np.arange(len(tokens)), tokens]


@pytest.fixture(scope="module")
def reference() -> AloneReference:
    return AloneReference(GQA)


def assert_law(particles: Particles, total: np.ndarray, reference: AloneReference) -> int:
    """Every particle's summed ``log p`` is the reference's for its prompt and tokens; returns the tokens
    checked."""
    assert particles.prompt_tokens is not None
    checked = 0
    for b in range(particles.num_prompts):
        for i in range(particles.num_particles):
            tokens = particles.tokens[b, i, : particles.lengths[b, i]]
            expected = reference.log_probs(particles.prompt_tokens[b], tokens).sum()
            np.testing.assert_allclose(total[b, i], expected, rtol=1e-5, atol=2e-5, err_msg=f"prompt {b}")
            checked += len(tokens)
    return checked


def run_resampled(
    policy: OnnxCausalLM,
    particles: Particles,
    rng: np.random.Generator,
    resample: bool = True,
    each_step: Optional[Callable[[Particles], None]] = None,
) -> np.ndarray:
    """Steps until every particle has finished, the particles resampled (random ancestors) after each
    where ``resample``, ``each_step`` called on them before the first step and after every one; returns
    each particle's summed ``log p``, carried through the resampling."""
    total = np.zeros(particles.lengths.shape)
    while True:
        if each_step is not None:
            particles.flush()
            each_step(particles)
        if particles.finished.all():
            return total
        total += policy.propose(particles, rng)
        if resample:
            ancestors = rng.integers(0, particles.num_particles, size=total.shape)
            particles.reorder(ancestors)
            total = np.take_along_axis(total, ancestors, axis=1)


def assert_values(
    reference: AloneReference, tolerance: float, checked: list[int]
) -> Callable[[Particles], None]:
    """A ``run_resampled`` check: each particle's value (``lm.value``) is the reference's value head at the
    last token of its sequence run alone; appends the particles checked to ``checked``."""

    def check(particles: Particles) -> None:
        assert particles.prompt_tokens is not None
        for b in range(particles.num_prompts):
            for i in range(particles.num_particles):
                tokens = particles.tokens[b, i, : particles.lengths[b, i]]
                expected = reference.value(particles.prompt_tokens[b], tokens)
                value = particles.state["lm.value"][b, i]
                np.testing.assert_allclose(value, expected, rtol=tolerance, atol=tolerance)
        checked.append(particles.lengths.size)

    return check


@pytest.mark.parametrize("in_place", [True, False], ids=["cache-in-place", "cache-copied"])
@pytest.mark.parametrize(
    ("step", "below"),
    [("token", 0.0), ({SPACE}, 0.0), ({SPACE}, 0.75)],
    ids=["token", "space-step-every-row", "space-step-fewer-rows"],
)
def test_particles_follow_the_law_through_padding_and_resampling(
    reference: AloneReference, step: Any, below: float, in_place: bool
) -> None:
    """Ragged prompts, rows that sit out calls (finished, or their step written), resampling between
    steps: each particle's ``log p`` is that of its tokens run alone, with the KV cache written in place
    by the session or returned as a new array at each call."""
    # a few frequent ids end trajectories, so rows finish at different calls
    policy = OnnxCausalLM(
        GQA, max_new_tokens=9, step=step, step_rows_below=below, eos_token_id=ENDS, cache_in_place=in_place
    )
    assert policy.padding_side == "right" and policy.cache_in_place == in_place
    particles = policy.start(PROMPTS, 5)
    assert "lm.mask" in particles.right_padded
    total = run_resampled(policy, particles, np.random.default_rng(4))
    lengths = particles.lengths
    assert lengths.min() < lengths.max()  # rows of different lengths sat out calls
    assert assert_law(particles, total, reference) > 60


def test_long_prompts_start_one_row_at_a_time(reference: AloneReference) -> None:
    """Prompts wider than ``prefill_tokens`` start row by row in pieces (the operator takes a piece after a
    cache on one row only), or whole where the graph computes pieces wrongly: the same logits as one call,
    and the same law afterwards."""
    prompts = ["abc", "the quick brown", "xy"]
    whole_policy = OnnxCausalLM(GQA, max_new_tokens=4)
    whole = whole_policy.start(prompts, 2)
    assert whole_policy._pieces_follow is None  # prompts within prefill_tokens: pieces never tried
    pieces_policy = OnnxCausalLM(GQA, max_new_tokens=4, prefill_tokens=4)
    pieces = pieces_policy.start(prompts, 2)
    assert pieces_policy._pieces_follow is not None  # tried once (ONNX Runtime 1.19: wrong, rows run whole)
    np.testing.assert_allclose(pieces.state["lm.logits"], whole.state["lm.logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pieces.state["lm.mask"], whole.state["lm.mask"])
    rng = np.random.default_rng(8)
    total = np.zeros(pieces.lengths.shape)
    while not pieces.finished.all():
        total += pieces_policy.propose(pieces, rng)
    assert assert_law(pieces, total, reference) > 0


def test_batches_join_right_padded_and_trim_on_the_right(reference: AloneReference) -> None:
    """Batches of other widths join padded on the right; a leaving range keeps views (or trims the
    trailing columns that are padding in every row kept, at least half the width), and the joined batch
    goes on drawing from the law."""
    policy = OnnxCausalLM(GQA, max_new_tokens=6)
    rng = np.random.default_rng(2)
    long, short = policy.start(["the quick brown fox"], 2), policy.start(["a"], 3)
    totals = [np.zeros(long.lengths.shape), np.zeros(short.lengths.shape)]
    totals[0] += policy.propose(long, rng)  # the long batch has a step more
    joined = Particles.concatenate([long.one_per_prompt(), short.one_per_prompt()])
    mask = joined.state["lm.mask"]
    long_width = long.state["lm.mask"].shape[-1]
    assert mask.shape == (5, 1, long_width)
    np.testing.assert_array_equal(mask[2:, 0, :1], 1)  # the short prompt starts at the first column
    np.testing.assert_array_equal(mask[2:, 0, 1:], 0)
    key = next(k for k in joined.aligned if k != "lm.mask")
    np.testing.assert_array_equal(joined.state[key][2:, :, :, :1], short.one_per_prompt().state[key])
    # its columns after are never read (GroupQueryAttention reads each row's length): not copied
    total = np.concatenate([t.reshape(-1, 1) for t in totals])
    for _ in range(2):
        total += policy.propose(joined, rng)
    joined.flush()
    assert_law(joined, total, reference)
    width = joined.state["lm.mask"].shape[-1]
    used = int(joined.state["lm.mask"][2:].sum(axis=-1).max())
    assert width - used >= width / 2  # the long prompt's columns: most of the width
    kept = joined.view_rows(2, 5)  # the long prompt leaves: the columns after `used` are padding in every row
    assert kept.state["lm.mask"].shape[-1] == used and kept.state["lm.mask"][..., -1].any()
    narrow = joined.view_rows(0, 5)  # nobody leaves: views, nothing trimmed
    assert np.shares_memory(narrow.state[key], joined.state[key])
    selected = joined.select([2, 3, 4])
    assert selected.state["lm.mask"].shape[-1] == used and selected.state["lm.mask"][..., -1].any()
    rest = total[2:]
    while not selected.finished.all():
        rest += policy.propose(selected, rng)
    assert_law(selected, rest, reference)


def test_a_lone_engine_request_is_the_offline_result() -> None:
    """The serving engine runs right-padded requests on the offline step machinery: a request alone is the
    offline result bitwise (requests joining a running batch: ``tests/test_engine.py``)."""
    policy = OnnxCausalLM(GQA, max_new_tokens=6)
    reward = OnnxRewardModel(PRM, kind="logit")
    with tiltsmc.Engine(policy, reward) as engine:
        lone = engine.submit(PROMPTS[2], "smc", num_particles=6, rng=3).result(timeout=60)
    offline = tiltsmc.smc(policy, reward, prompts=[PROMPTS[2]], num_particles=6, rng=3)
    assert lone.texts == offline.texts and np.array_equal(lone.log_z, offline.log_z)


def test_device_cache_is_refused_right_padded() -> None:
    with pytest.raises(ValueError, match="device_cache: not available with padding_side='right'"):
        OnnxCausalLM(GQA, max_new_tokens=4, padding_side="right", device_cache=True)


def _no_device_cache() -> str:
    """Why ``device_cache=True`` cannot be asked for here ("" where it can)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this ONNX Runtime has no CUDA provider"
    from tiltsmc import core
    from tiltsmc.models._ort import cuda_device_usable

    usable, reason = cuda_device_usable()
    if not usable:
        return f"no usable CUDA device: {reason}"
    availability = core.cuda_available()
    return "" if availability else f"tiltsmc's CUDA kernels are not usable: {availability.reason}"


@pytest.mark.gpu
@pytest.mark.skipif(bool(_no_device_cache()), reason=_no_device_cache() or "runs on a GPU")
def test_device_cache_asked_for_is_refused_where_right_padding_is_found() -> None:
    """``device_cache=True`` with ``padding_side=None``: the graph is found right-padded at load (here by
    its GroupQueryAttention, without the batching check), and the cache asked for is refused as with
    ``padding_side="right"``, not dropped silently (only the default, None, falls back to the host)."""
    with pytest.raises(ValueError, match="device_cache: not available with padding_side='right'"):
        OnnxCausalLM(
            GQA,
            max_new_tokens=4,
            providers=["CUDAExecutionProvider"],
            device_cache=True,
            check_batching=False,
        )


def test_a_value_head_is_read_at_each_rows_last_token() -> None:
    """The policy's own value head, right-padded: after the prompts and after every step, each particle's
    value is the head's at the last token of its sequence run alone (finished rows keep their last), and
    its tokens follow the law; ``PolicyValue`` serves it to the samplers and the engine."""
    reference = AloneReference(GQA_VALUE)
    policy = OnnxCausalLM(GQA_VALUE, max_new_tokens=6, value_output="value", eos_token_id=ENDS)
    assert policy.padding_side == "right"
    particles = policy.start(PROMPTS, 3)
    checked: list[int] = []
    check = assert_values(reference, 1e-5, checked)
    total = run_resampled(policy, particles, np.random.default_rng(6), resample=False, each_step=check)
    assert len(checked) > 2
    assert particles.lengths.min() < particles.lengths.max()
    assert_law(particles, total, reference)
    value = PolicyValue(policy)
    with tiltsmc.Engine(policy, value) as engine:
        served = engine.submit(PROMPTS[1], "smc", num_particles=4, rng=9).result(timeout=60)
    offline = tiltsmc.smc(policy, value, prompts=[PROMPTS[1]], num_particles=4, rng=9)
    assert served.texts == offline.texts and np.array_equal(served.log_z, offline.log_z)


def test_the_cache_is_written_in_place_where_the_graph_allows() -> None:
    """By default a right-padded GroupQueryAttention graph keeps its cache in arrays the session writes:
    the same arrays after a step that needs no more columns, wider than the mask (room for later steps);
    a step past their width moves them into wider ones once."""
    policy = OnnxCausalLM(GQA, max_new_tokens=30, eos_token_id=[])
    difference, scale = policy.in_place_difference()
    assert difference <= 1e-6 * max(1.0, scale)
    assert policy.cache_in_place
    particles = policy.start(PROMPTS, 3)
    rng = np.random.default_rng(0)
    policy.propose(particles, rng)
    particles.flush()
    key = "lm.cache.0.key"
    before = particles.state[key]
    assert before.shape[3] > particles.state["lm.mask"].shape[2]  # capacity past the mask: written in place
    grown = 0
    for _ in range(25):
        policy.propose(particles, rng)
        particles.flush()
        width = particles.state["lm.mask"].shape[2]
        assert particles.state[key].shape[3] >= width
        if particles.state[key] is not before:
            grown += 1
            before = particles.state[key]
    assert 1 <= grown <= 2  # 25 columns more: one or two moves, not one a step


def test_the_cache_written_in_place_is_never_wider_than_the_context() -> None:
    """The arrays never grow past the model's context (``max_length``): ONNX Runtime 1.19's operator
    refuses a buffer longer than its rotary table (``cos_cache dimension 0 ... total_sequence_length``),
    which a growth by a quarter would reach near the end of a long request."""
    policy = OnnxCausalLM(GQA, max_new_tokens=26, eos_token_id=[], max_length=30)
    particles = policy.start(["ok"], 2)  # 2 tokens: 18 columns, then 18 + 16 = 34, past the context
    rng = np.random.default_rng(1)
    widths = set()
    for _ in range(26):
        policy.propose(particles, rng)
        particles.flush()
        widths.add(particles.state["lm.cache.0.key"].shape[3])
    assert particles.lengths.min() == 26 and not particles.errors
    assert max(widths) == 30 and len(widths) > 1, widths  # grown, up to the context and no further


def poison_unwritten(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in every column of a KV cache written in place that tiltsmc leaves as it was (the memory of
    spare rows and of wider caches, a row's columns past its own after a newcomer takes it over, and
    after every reorder, which copies a particle only the columns its ancestor's mask counts): a session
    that read one would give NaN."""
    make = particles_module._SpareRows.make

    def poisoned_make(self: Any, shape: Any, dtype: Any) -> np.ndarray:
        made = make(self, shape, dtype)
        made.base[...] = np.nan
        return made

    widened = onnx_lm.widened

    def poisoned_widened(array: np.ndarray, width: int, axis: int) -> np.ndarray:
        grown = widened(array, width, axis)
        grown[(*(slice(None),) * axis, slice(array.shape[axis], None))] = np.nan
        return grown

    fill_rows = Particles.fill_rows

    def poisoned_fill_rows(self: Particles, rows: Any, part: Particles) -> bool:
        where = slice(rows, rows + part.num_prompts) if isinstance(rows, int) else np.asarray(rows)
        saved = {key: self.state[key][where].copy() for key in self.in_place}
        for key in self.in_place:
            self.state[key][where] = np.nan
        if fill_rows(self, rows, part):
            return True
        for key, kept in saved.items():
            self.state[key][where] = kept
        return False

    reorder = Particles.reorder

    def poisoned_reorder(self: Particles, ancestors: Any, *, across_prompts: bool = False) -> None:
        reorder(self, ancestors, across_prompts=across_prompts)
        for key, (axis, mask_key) in self._prefixes().items():
            lengths = np.count_nonzero(self.state[mask_key], axis=-1)  # (B, N): each row's columns read
            array = self.state[key]
            for index in np.ndindex(*lengths.shape):
                array[(*index, *(slice(None),) * (axis - 2), slice(int(lengths[index]), None))] = np.nan

    monkeypatch.setattr(particles_module._SpareRows, "make", poisoned_make)
    monkeypatch.setattr(onnx_lm, "widened", poisoned_widened)
    monkeypatch.setattr(Particles, "fill_rows", poisoned_fill_rows)
    monkeypatch.setattr(Particles, "reorder", poisoned_reorder)


def test_cache_in_place_is_bitwise_the_copied_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seeded runs with the cache written in place and copied give the same samples, weights
    and log Z bit for bit: a policy with a value head (the value read from the same call), and multi-token
    steps whose calls run on the rows still writing them; the other samplers draw the same samples. In
    place, every column no row has written holds NaN (``poison_unwritten``): none is read."""
    poison_unwritten(monkeypatch)
    cases = [
        (dict(value_output="value"), GQA_VALUE, True),
        (dict(step={SPACE}, step_rows_below=0.75), GQA, False),
    ]
    for options, path, value_head in cases:
        results = []
        for in_place in (True, False):
            policy = OnnxCausalLM(path, max_new_tokens=12, cache_in_place=in_place, **options)
            reward: Any = (
                PolicyValue(policy, kind="logit") if value_head else OnnxRewardModel(PRM, kind="logit")
            )
            results.append(tiltsmc.smc(policy, reward, PROMPTS, num_particles=6, rng=5))
        placed, copied = results
        assert placed.texts == copied.texts
        np.testing.assert_array_equal(placed.log_z, copied.log_z)
        for a, b in zip(placed.log_weights, copied.log_weights):
            np.testing.assert_array_equal(a, b)
    # the other samplers: the same draws
    policies = [
        OnnxCausalLM(GQA, max_new_tokens=8, eos_token_id=ENDS, cache_in_place=c) for c in (True, False)
    ]
    prm = OnnxRewardModel(PRM, kind="logit")
    for sampler, options in (
        (tiltsmc.sp_gsmc, dict(pool_size=4)),
        (tiltsmc.mh, dict(pool_size=2, steps=2, num_particles=3)),
        (tiltsmc.best_of_n, dict(n=4)),
        (tiltsmc.rejection, dict(bound=1.0, num_samples=2, max_tries=40)),
    ):
        placed, copied = (sampler(policy, prm, PROMPTS[:2], rng=3, **options) for policy in policies)
        assert placed.texts == copied.texts, sampler.__name__


def test_cache_in_place_is_refused_where_it_cannot_be() -> None:
    """A left-padded policy (an optimum export) cannot write its cache in place: asked for, it is refused
    by name; by default it is off. A value that is not a bool is refused too."""
    gpt2 = FIXTURES / "gpt2-tiny"
    assert not OnnxCausalLM(gpt2).cache_in_place
    with pytest.raises(ValueError, match=r"cache_in_place: needs a right-padded policy.*left-padded"):
        OnnxCausalLM(gpt2, cache_in_place=True)
    with pytest.raises(TypeError, match="cache_in_place: expected None, True or False, got 'yes'"):
        OnnxCausalLM(GQA, cache_in_place="yes")  # type: ignore[arg-type]
    assert not OnnxCausalLM(GQA, cache_in_place=False).cache_in_place


@pytest.mark.parametrize("value_head", [True, False])
def test_runs_joining_a_lane_write_only_their_rows(monkeypatch: pytest.MonkeyPatch, value_head: bool) -> None:
    """A lane of runs joining one or two steps apart, the policy's cache written in place (the reward a
    value head of the policy's graph, or a reward model of its own): the joins write the newcomers over
    the rows of runs that left, or behind the batch's, into spare rows (the batch's cache not copied),
    and every run's samples are those it draws alone, its log Z and weights the same to float rounding.
    The columns no row has written hold NaN (``poison_unwritten``), the rows of runs that left among
    them."""
    poison_unwritten(monkeypatch)
    if value_head:
        policy = OnnxCausalLM(GQA_VALUE, max_new_tokens=4, eos_token_id=ENDS, value_output="value")
        reward: Any = PolicyValue(policy, kind="logit")
    else:
        policy = OnnxCausalLM(GQA, max_new_tokens=4, eos_token_id=ENDS)
        reward = OnnxRewardModel(PRM, kind="logit")
    models = Models(policy, reward, Compute())
    behind = particles_module._SPARE_ROWS.behind
    spare_joins: list[bool] = []

    def counted(array: np.ndarray, rows: int, move: bool = False) -> Any:
        found = behind(array, rows, move)
        spare_joins.append(found is not None)
        return found

    monkeypatch.setattr(particles_module._SPARE_ROWS, "behind", counted)
    fill_rows = Particles.fill_rows
    fills: list[bool] = []

    def counted_fill(self: Particles, rows: Any, part: Particles) -> bool:
        fills.append(fill_rows(self, rows, part))
        return fills[-1]

    monkeypatch.setattr(Particles, "fill_rows", counted_fill)

    def run(seed: int) -> Any:
        prompt = PROMPTS[seed % len(PROMPTS)]
        return smc_run(
            models, [prompt], 3, "systematic", 0.5, "naive", seed, record_ancestry=False, max_steps=100,
        )  # fmt: skip

    lane = Lane(models, "guided")
    runs = [run(seed) for seed in range(14)]
    waiting, ended = list(runs), 0
    while ended < len(runs):
        for _ in range(1 if len(waiting) % 3 else 2):  # one or two runs join at a step
            if waiting:
                lane.add(waiting.pop(0))
        for _, error in lane.step():
            assert error is None
            ended += 1
    assert sum(fills) >= 2, fills  # newcomers took over the rows of runs that had left
    assert sum(spare_joins) >= 8, spare_joins  # and joined behind, into spare rows: four tensors a join
    for seed, together in enumerate(runs):
        alone = run_alone(models, run(seed))
        assert isinstance(alone, SamplerResult) and together.result is not None
        assert alone.texts == together.result.texts
        np.testing.assert_allclose(alone.log_z, together.result.log_z, rtol=1e-4, atol=1e-5)


def test_a_llama_rewritten_to_grouped_query_attention_keeps_its_law() -> None:
    """``demo-policy-gqa``: the demo's policy (optimum's Llama export) rewritten by
    ``scripts/make_gqa_llama.py``, every layer's attention one GroupQueryAttention node that applies the
    rotary embedding at each row's own positions. Right-padded with its cache written in place, ragged
    prompts, rows that finish early, resampling between steps: each particle's ``log p`` is the optimum
    export's for its tokens (one session call over the unpadded sequence, ``position_ids`` given)."""
    policy = OnnxCausalLM(FIXTURES / "demo-policy-gqa", max_new_tokens=14)
    assert policy.padding_side == "right" and policy.cache_in_place and not policy.has_position_ids
    source = AloneReference(Path(arithmetic.__file__).parent / "arithmetic_models" / "policy")
    prompts = [problem.prompt for problem in arithmetic.make_problems(3, 2, rng=1)]
    prompts += [problem.prompt for problem in arithmetic.make_problems(1, 2, rng=2)]
    particles = policy.start(prompts, 4)
    total = run_resampled(policy, particles, np.random.default_rng(7))
    assert assert_law(particles, total, source) > 150


def test_the_cli_passes_cache_in_place_to_the_policy() -> None:
    """``--cache-in-place on|off`` (default: on where the trial passes) reaches the policy; asked of a
    left-padded policy, the command fails naming it."""
    parser = cli.build_parser()
    base = ["run", "--prompt", "hi", "--reward", str(PRM)]
    for flags, expected in (
        ([], True),
        (["--cache-in-place", "off"], False),
        (["--cache-in-place", "on"], True),
    ):
        policy, _ = cli._load_models(parser.parse_args([*base, "--policy", str(GQA), *flags]))
        assert policy.cache_in_place is expected
    args = parser.parse_args([*base, "--policy", str(FIXTURES / "gpt2-tiny"), "--cache-in-place", "on"])
    with pytest.raises(cli.CliError, match="--cache-in-place: needs a right-padded policy"):
        cli._load_models_or_fail(args)


def test_the_demos_joint_graph_in_the_gqa_layout_keeps_its_law_and_values() -> None:
    """``arithmetic_models/joint-gqa`` (``scripts/train_demo.py joint-gqa``): the demo's policy and PRM head
    in one GroupQueryAttention graph, the PRM's running error count in a cache layer the operator writes at
    each row's columns. Right-padded with its cache in place, steps of a line, resampling between steps:
    after every step each particle's value is the optimum joint graph's at the last token of its sequence
    run alone, and its tokens follow that graph's law."""
    models = Path(arithmetic.__file__).parent / "arithmetic_models"
    reference = AloneReference(models / "joint")
    policy, reward = arithmetic.load_models(gqa=True)
    assert policy.padding_side == "right" and policy.cache_in_place and isinstance(reward, PolicyValue)
    prompts = [problem.prompt for problem in arithmetic.make_problems(4, 3, rng=5)]
    particles = policy.start(prompts, 4)
    checked: list[int] = []
    total = run_resampled(
        policy, particles, np.random.default_rng(8), each_step=assert_values(reference, 1e-4, checked)
    )
    assert sum(checked) >= 48  # after the prompts and each of three lines at least
    assert assert_law(particles, total, reference) > 150
    with pytest.raises(ValueError, match=r"gqa: the GroupQueryAttention layout is the joint graph's"):
        arithmetic.load_models(joint=False, gqa=True)


def test_the_demo_loads_the_layout_written_in_place_where_it_runs_on_the_cpu() -> None:
    """``arithmetic.load_models()`` (``gqa=None``) loads ``joint-gqa`` where the session runs on the CPU
    and the optimum ``joint/`` where it is asked to run on CUDA (the cache is written in place on the host
    only); ``gqa=False`` the optimum one anyway."""
    assert not picks_cuda(["CPUExecutionProvider"])
    assert picks_cuda([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    policy, _ = arithmetic.load_models(providers=["CPUExecutionProvider"])
    assert policy.model_file.parent.name == "joint-gqa" and policy.cache_in_place
    policy, _ = arithmetic.load_models()
    assert policy.model_file.parent.name == ("joint" if picks_cuda() else "joint-gqa")
    policy, _ = arithmetic.load_models(gqa=False)
    assert policy.model_file.parent.name == "joint" and policy.padding_side == "left"


def test_threads_sharing_a_grouped_query_attention_policy_get_their_own_results() -> None:
    """Two threads sampling from one right-padded policy at once get what each gets alone, as two engine
    workers sharing it do. ONNX Runtime before 1.20 computes GroupQueryAttention with rotary embeddings
    wrongly for concurrent calls of one session (1.19.2 without the policy's lock: 2 of 5 rounds of this
    differed; gqa-tiny, without rotary, showed nothing), so there the policy makes them one at a time."""
    policy, reward = arithmetic.load_models(joint=True, gqa=True)
    assert policy.padding_side == "right"
    jobs = list(enumerate(problem.prompt for problem in arithmetic.make_problems(6, 4, rng=1)))

    def texts(job: tuple[int, str]) -> Any:
        return tiltsmc.smc(policy, reward, [job[1]], num_particles=8, rng=job[0]).texts

    alone = [texts(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            assert list(pool.map(texts, jobs * 2)) == alone * 2
    assert isinstance(policy._one_call_at_a_time, type(threading.Lock())) == (runtime_version() < (1, 20))


def test_threads_sharing_a_grouped_query_attention_reward_model_get_their_own_values() -> None:
    """Two threads scoring with one reward model whose graph is a GroupQueryAttention decoder (the demo's,
    with rotary embeddings; re-encoded, right-padded) get what each gets alone, as two engine workers
    sharing it do. Before ONNX Runtime 1.20 its calls go one at a time, as the policy's do (1.19.2 without
    the lock: 106 of 600 batches of this differed)."""
    reward = OnnxRewardModel(Path(arithmetic.__file__).parent / "arithmetic_models" / "joint-gqa",
                             output="value", kind="logit")  # fmt: skip
    assert not reward.kv_cached
    generator = np.random.default_rng(5)
    batches = [
        [generator.integers(3, 34, size=int(length)) for length in generator.integers(1, 60, size=rows)]
        for rows in (7, 3, 5, 9, 4, 6)
    ]
    alone = [reward._score(batch) for batch in batches]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            for values, expected in zip(pool.map(reward._score, batches * 2), alone * 2):
                np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)
    assert isinstance(reward._one_call_at_a_time, type(threading.Lock())) == (runtime_version() < (1, 20))
