"""Encoding as Hugging Face does (the post-processor's special tokens added, special tokens skipped when
decoding), chat messages rendered by the tokenizer folder's chat template, on real tokenizers and the
fixture decoders."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiltsmc
from tiltsmc.cli import output_schema
from tiltsmc.models import OnnxCausalLM, OnnxRewardModel, chat
from tiltsmc.models.tokenizer import load_tokenizer
from tiltsmc.tasks import arithmetic
from time_limits import at_most

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA, PRM, CHAT = FIXTURES / "llama-tiny", FIXTURES / "prm-tiny", FIXTURES / "chat-tiny"
BOS, IM_START, IM_END = 0, 62, 63
SYSTEM = "<|im_start|>system\nyou are a tiny test model.<|im_end|>\n"

pytest.importorskip("jinja2")


def chat_policy(**options: Any) -> OnnxCausalLM:
    """The Llama fixture with the chat tokenizer (the same 64 ids; ChatML markers at 62, 63)."""
    return OnnxCausalLM(LLAMA, tokenizer=CHAT, max_new_tokens=6, eos_token_id=[BOS, IM_END], **options)


def ids(text: str) -> list[int]:
    """The fixture vocabulary's ids of plain lower-case text (character level: a-z 3.., space 39)."""
    table = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789 ", start=3)}
    table.update({".": 40, "\n": 55})
    return [table[c] for c in text]


def _without_specials(text: str) -> str:
    for token in ("<|endoftext|>", "<pad>", "<unk>"):  # the fixtures' special tokens
        text = text.replace(token, "")
    return text


# -- encoding and decoding ------------------------------------------------------------------------------


def test_text_prompts_get_the_post_processors_bos() -> None:
    policy = chat_policy()
    assert policy.encode_prompt("hi there").tolist() == [BOS, *ids("hi there")]
    plain = chat_policy(add_special_tokens=False)
    assert plain.encode_prompt("hi there").tolist() == ids("hi there")
    # token ids are used as given, whatever the setting
    assert policy.encode_prompt([5, 6]).tolist() == [5, 6]


def test_fixtures_and_demo_tokenizers_add_nothing() -> None:
    """Their tokenizer.json has no post-processor: encoding is the same either way, so the demo's models
    see the encoding they were trained on (scripts/train_demo.py encodes without special tokens)."""
    for folder in (LLAMA, arithmetic.MODELS_DIR / "policy", arithmetic.MODELS_DIR / "prm"):
        assert json.loads((folder / "tokenizer.json").read_text())["post_processor"] is None
    policy, _ = arithmetic.load_models()
    prompt = arithmetic.make_problems(1, 4, rng=0)[0].prompt
    assert policy.tokenizer is not None
    np.testing.assert_array_equal(
        policy.encode_prompt(prompt), policy.tokenizer.encode(prompt, add_special_tokens=False)
    )


def test_decoding_skips_special_tokens_unless_asked() -> None:
    tokens = [*ids("ab"), BOS, 1]  # text, then <|endoftext|> and <pad>
    assert OnnxCausalLM(LLAMA).decode(tokens) == "ab"
    assert OnnxCausalLM(LLAMA, skip_special_tokens=False).decode(tokens) == "ab<|endoftext|><pad>"
    texts = {}
    for skip in (True, False):
        policy = OnnxCausalLM(LLAMA, max_new_tokens=40, skip_special_tokens=skip)
        result = tiltsmc.smc(policy, OnnxRewardModel(PRM), prompts=["a"], num_particles=32, rng=0)
        assert result.texts is not None
        texts[skip] = result.texts[0]
    samples = result.samples[0]  # the same draws either way: decoding does not change the run
    ended = [k for k, s in enumerate(samples) if len(s) and s[-1] == BOS]
    assert ended and all(texts[False][k].endswith("<|endoftext|>") for k in ended)
    assert texts[True] == [_without_specials(t) for t in texts[False]]


def test_options_are_checked() -> None:
    with pytest.raises(TypeError, match="add_special_tokens"):
        OnnxCausalLM(LLAMA, add_special_tokens="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="skip_special_tokens"):
        OnnxCausalLM(LLAMA, skip_special_tokens=1)  # type: ignore[arg-type]


# -- chat templates -------------------------------------------------------------------------------------


def test_chat_template_renders_as_transformers_does() -> None:
    """ChatML as SmolLM2-Instruct's template writes it: block tags on their own lines leave no blank
    lines (trim_blocks, lstrip_blocks), a default system message, the assistant's turn opened."""
    tokenizer = load_tokenizer(CHAT, None)
    assert tokenizer is not None and tokenizer.chat_template is not None
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(user) == (
        SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="roles are system, user and assistant, not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])
    # the helpers templates call: tojson keeps non-ASCII text, loop controls, {% generation %} blocks
    helpers = load_tokenizer(
        CHAT, None,
        chat_template="{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}",
    )  # fmt: skip
    assert helpers is not None
    rendered = helpers.apply_chat_template(
        [{"role": "user", "content": "café"}, {"role": "user", "content": "x"}]
    )
    assert rendered == '{"role": "user", "content": "café"}[café]'


def test_chat_is_encoded_without_adding_special_tokens_again() -> None:
    """The template writes the special tokens: none is added on top (transformers'
    apply_chat_template(tokenize=True)); one that writes the BOS itself gets exactly one."""
    policy = chat_policy()
    messages = [{"role": "user", "content": "hi"}]
    encoded = policy.encode_prompt(messages).tolist()
    expected = [IM_START, *ids("system\nyou are a tiny test model."), IM_END, 55, IM_START, *ids("user\nhi"),
                IM_END, 55, IM_START, *ids("assistant\n")]  # fmt: skip
    assert encoded == expected
    with_bos = chat_policy(
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert with_bos.encode_prompt(messages).tolist() == [BOS, *ids("hi")]


def test_template_from_tokenizer_config_and_special_tokens(tmp_path: Path) -> None:
    """Older exports keep the template in tokenizer_config.json (a string, or named templates)."""
    shutil.copy(CHAT / "tokenizer.json", tmp_path)
    config = json.loads((CHAT / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": "{{ eos_token }}|{{ messages[0]['content'] }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path, None)
    assert tokenizer is not None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_end|>|x"
    config["chat_template"] = 3
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat_template: expected a Jinja template string"):
        load_tokenizer(tmp_path, None)


def test_chat_prompts_in_the_samplers_and_the_engine() -> None:
    """Messages are prompts everywhere; the reward model scores the very ids the policy encoded."""
    policy = chat_policy()
    reward = OnnxRewardModel(PRM, tokenizer=CHAT)
    messages = [{"role": "user", "content": "2+2="}]
    particles = policy.start([messages, "2+2="], 4)
    assert particles.prompt_tokens is not None
    assert particles.prompt_tokens[0].tolist() == policy.encode_prompt(messages).tolist()
    assert particles.prompt_tokens[1].tolist() == [BOS, 31, 47, 31, 50]  # 2 + 2 =
    np.testing.assert_array_equal(
        reward.initial_log_value(particles), reward._score([t for t in particles.prompt_tokens])
    )
    offline = tiltsmc.smc(policy, reward, prompts=[messages], num_particles=4, rng=5)
    assert not offline.errors
    with tiltsmc.Engine(policy, reward) as engine:
        served = engine.submit(messages, "smc", num_particles=4, rng=5).result(timeout=60)
    np.testing.assert_allclose(served.log_z, offline.log_z, rtol=1e-5)
    assert served.texts == offline.texts


def test_chat_errors_are_clear() -> None:
    no_template = OnnxCausalLM(LLAMA, max_new_tokens=4)
    result = tiltsmc.smc(
        no_template,
        OnnxRewardModel(PRM),
        prompts=[[{"role": "user", "content": "a"}], "a"],
        num_particles=2,
        rng=0,
    )
    assert "needs a chat template" in result.errors[0] and 1 not in result.errors
    one_message = tiltsmc.smc(
        chat_policy(), OnnxRewardModel(PRM, tokenizer=CHAT), prompts=[{"role": "user", "content": "a"}],
        num_particles=2, rng=0,
    )  # fmt: skip
    assert "a chat prompt is a list of messages" in one_message.errors[0]
    policy = chat_policy()
    with pytest.raises(ValueError, match="message 0: expected a 'role'"):
        policy.encode_prompt([{"content": "a"}])
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        chat_policy(chat_template="{% for %}").encode_prompt([{"role": "user", "content": "a"}])


def test_a_folders_template_that_does_not_compile_is_named_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chat template of the model's folder that does not compile is a warning at load naming the folder
    (it was not looked at until the first chat prompt: a server's chat clients were the first to learn of
    it); the model loads, text prompts run, chat prompts fail with the syntax error; a template given in
    its place silences it."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHAT / name, tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }")
    with caplog.at_level("WARNING", logger="tiltsmc.models.tokenizer"):
        policy = OnnxCausalLM(LLAMA, tokenizer=tmp_path, max_new_tokens=2)
    [record] = [r for r in caplog.records if r.name == "tiltsmc.models.tokenizer"]
    assert str(tmp_path) in record.getMessage()
    assert "does not compile" in record.getMessage() and "not a valid Jinja template" in record.getMessage()
    assert policy.encode_prompt("ab").tolist()[-2:] == ids("ab")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        policy.encode_prompt([{"role": "user", "content": "a"}])
    caplog.clear()
    with caplog.at_level("WARNING", logger="tiltsmc.models.tokenizer"):
        replaced = OnnxCausalLM(
            LLAMA, tokenizer=tmp_path, max_new_tokens=2, chat_template="{{ messages[0]['content'] }}"
        )
    assert not [r for r in caplog.records if r.name == "tiltsmc.models.tokenizer"]
    assert replaced.encode_prompt([{"role": "user", "content": "ab"}]).tolist()[-2:] == ids("ab")


def test_a_templates_own_failures_are_value_errors_and_nothing_is_evaluated_at_load(tmp_path: Path) -> None:
    """What a template's expressions raise as it renders (1/0, the sandbox's range limit, a macro calling
    itself) is a ValueError that says the chat template failed (they escaped as ZeroDivisionError,
    OverflowError, RecursionError); constant expressions wait for a render (Jinja evaluated them while it
    compiled: ``'x' * 10**9`` took seconds and gigabytes at load, ``10 ** 100000`` was refused there without
    naming chat_template); tokenizer_config.json's template lists are read strictly."""
    messages = [{"role": "user", "content": "a"}]
    for template, raised in [
        ("{{ 1/0 }}", "ZeroDivisionError"),
        ("{% for i in range(200000) %}{% endfor %}", "OverflowError"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
        ("{{ 10 ** 100000 }}", "ValueError: Exceeds the limit"),
    ]:
        chat.check_chat_template(template)  # compiles: nothing evaluated
        with pytest.raises(ValueError, match=f"^chat template failed on these messages: {raised}"):
            chat.render_chat_template(template, messages, {})
    assert chat.render_chat_template("{{ 'ab' * 2 }}{{ 2 ** 3 }}", messages, {}) == "abab8"
    shutil.copy(CHAT / "tokenizer.json", tmp_path)
    config = json.loads((CHAT / "tokenizer_config.json").read_text())
    for templates, message in [
        ([], "a list of templates with no named template, and none named 'default'"),
        (
            [{"name": ["default"], "template": "{{ 1 }}"}],
            "a list of templates with no named template, and none",
        ),
        (
            [{"name": "tool_use", "template": "{{ 1 }}"}],
            "a list of templates with templates named 'tool_use', and none named 'default'",
        ),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": templates}))
        with pytest.raises(ValueError, match=re.escape(f"tokenizer_config.json: chat_template: {message}")):
            load_tokenizer(tmp_path, None)
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"^tokenizer_config\.json: cannot read .*: RecursionError"):
        load_tokenizer(tmp_path, None)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="SIGALRM: POSIX")
def test_a_hostile_templates_render_is_bounded() -> None:
    """A render is bounded (its loops' items, the size of ``*`` and ``**`` results, the characters it
    renders): two nested loops of 99,999 ran for hours, stalling every chat prompt (a server's too), and
    ``content * 10**13`` ran out of memory, a MemoryError that escaped as such (the prompt's error read
    'prompt 0: '); each is a ValueError naming the chat template and the bound, at once. A render that runs
    out of memory all the same is a template failure."""
    messages = [{"role": "user", "content": "ab"}]
    bound = r"^chat template: stopped, a bound on its work: "
    nested = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}"
    deep = (
        "{% for i in range(2) recursive %}{% if loop.depth < 4 %}{{ loop(range(99999)) }}{% endif %}"
        "{% endfor %}"
    )
    text = "messages[0]['content'] * 1000"
    characters = f"{{% for c in {text} %}}{{% for d in {text} %}}{{% endfor %}}{{% endfor %}}"
    cases = [
        (nested, rf"{bound}its loops went past {chat.MAX_LOOP_ITEMS:,} items in one render"),
        (deep, rf"{bound}its loops went past {chat.MAX_LOOP_ITEMS:,} items"),
        (characters, rf"{bound}its loops went past {chat.MAX_LOOP_ITEMS:,} items"),
        ("{{ messages[0]['content'] * 10**13 }}", rf"{bound}'\*' would repeat a str to 20,000,000,000,000"),
        ("{{ [1, 2] * 10**13 }}", rf"{bound}'\*' would repeat a list to 20,000,000,000,000 items"),
        ("{{ 3 ** 1000000000 }}", rf"{bound}'\*\*' would make an integer of more than"),
        ("{{ (10 ** 300000) * (10 ** 300000) }}", rf"{bound}'\*' would make an integer of more than"),
        (
            "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}",
            rf"{bound}it rendered more than {chat.MAX_RENDERED_CHARS:,} characters",
        ),
        ("{{ 'x' | center(2**62) }}", rf"{bound}the filter 'center' would make more than"),
        # a width that no bound sees before str.format runs (the item of a list)
        (
            "{{ '{0:>{1[0]}}'.format('x', [2**62]) }}",
            r"^chat template failed on these messages: MemoryError$",
        ),
    ]
    for template, match in cases:
        chat.check_chat_template(template)
        with at_most(5.0), pytest.raises(ValueError, match=match):
            chat.render_chat_template(template, messages, {})
    policy = chat_policy(chat_template="{{ messages[0]['content'] * 10**13 }}")
    parts = policy.start([messages], 1)
    assert re.match(r"prompt 0: chat template: stopped, a bound on its work: '\*' would", parts.errors[0])
    # what real templates do with loops, ranges and * renders as before
    looped = (
        "{% for m in messages if m['role'] != 'system' %}{{ loop.index }}/{{ loop.length }}"
        "{% if loop.last %}.{% endif %}{% else %}none{% endfor %}"
        "{% for i in range(messages | length) | reverse %}{{ i }}{% endfor %}"
        "{% for k, v in messages[0] | dictsort %}{{ k }}={{ v }};{% endfor %}{{ '-' * 3 }}{{ 2 ** 10 }}"
        "{% for x in [[1, [2]], [3]] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
        "{% endif %}{% endfor %}"
    )
    chat_messages = [{"role": "system", "content": "s"}, *messages, {"role": "assistant", "content": "c"}]
    assert chat.render_chat_template(looped, chat_messages, {}) == (
        "1/2" + "2/2." + "210" + "content=s;role=system;" + "---1024" + "123"
    )
    assert chat.render_chat_template("{% for m in [] %}{% else %}none{% endfor %}", messages, {}) == "none"


def test_decode_and_encode_take_what_they_say() -> None:
    """Ids are integers (floats and bools were truncated to ints and decoded), text a string (None raised an
    AttributeError), and the flag a bool ('no' read as true)."""
    tokenizer = load_tokenizer(CHAT, None)
    assert tokenizer is not None
    assert tokenizer.decode([]) == "" and tokenizer.decode(np.array(ids("ab"), dtype=np.uint8)) == "ab"
    for bad in ([3.9, 4.2], [True], [math.inf]):
        with pytest.raises(ValueError, match=r"^decode: expected integer token ids"):
            tokenizer.decode(bad)
    with pytest.raises(TypeError, match=r"^encode: expected a string, got NoneType"):
        tokenizer.encode(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^skip_special_tokens: expected True or False, got 'no'"):
        tokenizer.decode(ids("ab"), skip_special_tokens="no")  # type: ignore[arg-type]


def test_chat_without_jinja2_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where jinja2 is not installed: the import fails, and the error says which extra brings it."""
    chat._compile.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'tiltsmc\[chat\]'"):
            chat_policy().encode_prompt([{"role": "user", "content": "a"}])
        with pytest.raises(ImportError, match=r"pip install 'tiltsmc\[chat\]'"):  # not one prompt's error
            tiltsmc.smc(
                chat_policy(),
                OnnxRewardModel(PRM, tokenizer=CHAT),
                prompts=[[{"role": "user", "content": "a"}]],
            )
        with tiltsmc.Engine(chat_policy(), OnnxRewardModel(PRM, tokenizer=CHAT)) as engine:
            future = engine.submit([{"role": "user", "content": "a"}], "smc", num_particles=2)
            assert isinstance(future.exception(timeout=60), ImportError)
            assert engine.submit("a", "smc", num_particles=2).result(timeout=60).log_z.shape == (1,)
    finally:
        chat._compile.cache_clear()
    assert chat_policy().encode_prompt("a").tolist() == [BOS, 3]  # text prompts need no jinja2


# -- the command line ----------------------------------------------------------------------------------


def cli_run(tmp_path: Path, *options: str) -> tuple[int, list[dict[str, Any]]]:
    from tiltsmc.cli import main

    out = tmp_path / "out.jsonl"
    code = main(
        ["run", "--policy", str(LLAMA), "--reward", str(PRM), "--particles", "2", "--max-new-tokens", "3",
         "--seed", "1", "--json", str(out), *options]
    )  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, records


def test_cli_chat_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--chat makes each --prompt a user message; --messages reads conversations from JSON lines; both go
    through the chat template (--chat-template here: the Llama fixture's folder has none)."""
    template = str(CHAT / "chat_template.jinja")
    code, records = cli_run(
        tmp_path, "--chat", "--chat-template", template, "--prompt", "hi", "--prompt", "yo"
    )
    assert code == 0 and [r["prompt"] for r in records] == [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "yo"}],
    ]
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "terse"}, {"role": "user", "content": "yo"}],
    ]
    messages = tmp_path / "chats.jsonl"
    messages.write_text("\n".join(json.dumps(c) for c in conversations) + "\n\n")
    code, again = cli_run(tmp_path, "--chat-template", template, "--messages", str(messages))
    assert code == 0 and [r["prompt"] for r in again] == conversations
    jsonschema = pytest.importorskip("jsonschema")  # in the "test" extra; a GPU machine may lack it
    validator = jsonschema.Draft202012Validator(output_schema())
    for record in [*records, *again]:  # a chat prompt is recorded as its messages, as the schema says
        validator.validate(record)
    assert again[0]["samples"] == records[0]["samples"]  # the same prompt, the same seed
    # without a template: refused before the run, naming the option
    capsys.readouterr()
    assert cli_run(tmp_path, "--messages", str(messages))[0] == 2
    assert "--messages: the policy's tokenizer" in capsys.readouterr().err
    messages.write_text('[{"role": "user", "content": "hi"}]\n{"role": "user"}\n')
    capsys.readouterr()
    assert cli_run(tmp_path, "--chat-template", template, "--messages", str(messages))[0] == 2
    assert "line 2: a chat prompt is a non-empty list of messages" in capsys.readouterr().err


def test_encoding_lets_other_threads_run() -> None:
    """``Tokenizer.encode`` gives the ids ``tokenizers``' own ``encode`` gives, but another Python thread
    goes on while it works (a server's event loop, an engine's worker). Measured as the longest time a
    watching thread is stalled during each encode, in the same run: the GIL-holding one stalls it for
    most of its run, ours for at most a quarter as long in one of three tries (16 - 43x shorter seen, with
    one or two busy processes beside it on 2 cores). A stall, not a count rate: the rate a thread counts at
    also falls when the machine is busy, and a busy CI machine failed the rate's 4x at 3.4x."""
    import threading
    import time

    tokenizer = load_tokenizer(None, CHAT)
    assert tokenizer is not None
    text = "the quick brown fox jumps over the lazy dog. " * 12_000  # about half a second to encode
    stalls: list[tuple[float, float]] = []  # (last seen running, next seen running), where over 1 ms
    stop = threading.Event()

    def watching() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            if now - last > 1e-3:
                stalls.append((last, now))
            last = now

    def longest_stall(encode: Any) -> tuple[float, float, list[int]]:
        """The longest stall of the watching thread within ``encode``'s run, the run's length, the ids."""
        time.sleep(0.02)
        began = time.perf_counter()
        encoded = encode()
        ended = time.perf_counter()
        within = [min(end, ended) - max(start, began) for start, end in list(stalls)]
        return max(within, default=0.0), ended - began, list(encoded)

    thread = threading.Thread(target=watching, daemon=True)
    thread.start()
    tries = []
    try:
        # Up to three tries: on a loaded machine the system may also take the watching thread off its core
        # for a while, a stall no encode causes; a GIL-holding encode stalls it in every try.
        for _ in range(3):
            held, held_seconds, held_ids = longest_stall(lambda: tokenizer.inner.encode(text).ids)
            ours, _, our_ids = longest_stall(lambda: tokenizer.encode(text))
            assert our_ids == held_ids and len(our_ids) > 10_000
            assert held >= 0.5 * held_seconds, (held, held_seconds)  # the measure sees a GIL-holding encode
            tries.append((ours, held))
            if ours <= held / 4:
                break
    finally:
        stop.set()
        thread.join()
    assert any(ours <= held / 4 for ours, held in tries), tries


def test_a_prompt_is_encoded_once_while_it_is_among_the_last_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A served prompt is encoded to check its length, to count its KV cache and when its batch starts:
    the policy keeps the last ``ENCODED_TEXTS`` texts' ids (read-only), texts and rendered chats alike,
    the same ids as encoding afresh; a refused text is not kept."""
    from tiltsmc.models import onnx_lm

    policy = chat_policy()
    assert policy.tokenizer is not None
    calls: list[str] = []
    encode = policy.tokenizer.encode

    def counted(text: str, add_special_tokens: Any = None) -> Any:
        calls.append(text)
        return encode(text, add_special_tokens)

    monkeypatch.setattr(policy.tokenizer, "encode", counted)
    messages = [{"role": "user", "content": "hi there"}]
    first = [policy.encode_prompt("hello world"), policy.encode_prompt(messages)]
    again = [policy.encode_prompt("hello world"), policy.encode_prompt(messages)]
    assert len(calls) == 2 and calls[0] == "hello world"
    assert all(a is b for a, b in zip(first, again)) and not first[0].flags.writeable
    assert list(first[0]) == list(encode("hello world")) and list(first[1]) == list(
        chat_policy().tokenizer.encode_chat(messages)
    )  # type: ignore[union-attr]
    for k in range(onnx_lm.ENCODED_TEXTS):  # the oldest are dropped
        policy.encode_prompt(f"text {k}")
    policy.encode_prompt("hello world")
    assert calls.count("hello world") == 2
    with pytest.raises(ValueError, match="not valid Unicode"):
        policy.encode_prompt("\ud800")
    with pytest.raises(ValueError, match="not valid Unicode"):
        policy.encode_prompt("\ud800")
    particles = policy.start(["hello world", messages], 2)  # the batch still starts from copies
    assert particles.prompt_tokens is not None and list(particles.prompt_tokens[0]) == list(first[0])


def test_a_tokenizer_in_a_folder_that_is_not_utf8_loads(tmp_path: Path) -> None:
    """tokenizers' from_file takes the path as UTF-8 text: a valid tokenizer.json there was called invalid."""
    import os

    if os.name != "posix" or sys.platform == "darwin":
        pytest.skip("file names of any bytes are POSIX (not macOS)")
    folder = tmp_path / os.fsdecode(b"t\xff")
    try:
        folder.mkdir()
    except OSError as error:
        pytest.skip(f"the file system refuses a name that is not UTF-8: {error}")
    shutil.copy(LLAMA / "tokenizer.json", folder / "tokenizer.json")
    tokenizer, reference = load_tokenizer(folder, None), load_tokenizer(LLAMA, None)
    assert tokenizer is not None and reference is not None
    assert tokenizer.encode("hello world").tolist() == reference.encode("hello world").tolist()
