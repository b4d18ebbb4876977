#!/usr/bin/env python3
"""Write tests/fixtures/models/chat-tiny/: a chat tokenizer for the 64-logit fixture decoders.

The fixtures' character-level vocabulary (see make_fixtures.py) with its last two characters, ``&`` (62)
and ``_`` (63), replaced by the ChatML markers ``<|im_start|>`` and ``<|im_end|>`` (special tokens), a
post-processor that adds the BOS ``<|endoftext|>`` (0) in front of every encoded text, as Llama-style
tokenizers do, and a ChatML chat template in ``chat_template.jinja`` (where transformers saves it since
4.43; older versions put it in ``tokenizer_config.json``) laid out over several lines (so rendering it
right needs ``trim_blocks`` and ``lstrip_blocks``, as transformers sets them), with a default system
message, as SmolLM2-Instruct's template has. Needs only the ``tokenizers`` library::

    python scripts/make_chat_fixture.py          # writes the folder
    python scripts/make_chat_fixture.py --check  # exits 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models" / "chat-tiny"

SPECIAL = ["<|endoftext|>", "<pad>", "<unk>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 ") + list(".,!?'\"-+*/=():;\n") + list("<>[]#%")
VOCAB = SPECIAL + CHARS + CHAT_MARKERS

TEMPLATE = """{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}
  {% endif %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
you are a tiny test model.<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def build() -> dict[str, str]:
    """The folder's files, by name."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    assert len(VOCAB) == 64 and len(set(VOCAB)) == 64
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL + CHAT_MARKERS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", 0)],
    )
    config = {
        "added_tokens_decoder": {
            str(VOCAB.index(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
            for t in SPECIAL + CHAT_MARKERS
        },
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "additional_special_tokens": CHAT_MARKERS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        tok.save(str(path))
        tokenizer_json = path.read_text(encoding="utf-8")
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "chat_template.jinja": TEMPLATE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        differ = [n for n, text in files.items() if (OUT / n).read_text(encoding="utf-8") != text]
        print("differ: " + ", ".join(differ) if differ else "chat-tiny: up to date")
        return 1 if differ else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(files)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
