"""Every Python code block of the README and of the user guide runs, each on its own.

A block is run alone, in a fresh namespace, from the repository's root (the examples use the fixtures in
``tests/fixtures/models``), so a block that relies on an import or a name from an earlier block fails here
as it would for a reader who copies it. Warnings are errors (``filterwarnings`` in pyproject.toml), and
blocks state their claims with ``assert`` where they can be checked.

A block may opt out with a first line ``# not run by the docs test: <reason>`` (visible to readers, who
then know the block needs something more, such as a running server); the opted-out blocks are reported as
skipped with their reason, and there may be only a few of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The README and the guide: every page a user is told to read and copy from.
PAGES = [
    ROOT / "README.md",
    DOCS / "index.md",
    DOCS / "getting-started.md",
    *sorted((DOCS / "guide").glob("*.md")),
]
OPT_OUT = "# not run by the docs test:"
MAX_OPTED_OUT = 3
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def opt_out_reason(self) -> str | None:
        first = self.code.lstrip("\n").split("\n", 1)[0].strip()
        return first[len(OPT_OUT) :].strip() or "no reason given" if first.startswith(OPT_OUT) else None


def python_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("info").strip().split(" ")[0] not in ("python", "py"):
            continue
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("body").split("\n"))
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append(Block(page, line, code))
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def test_the_pages_have_python_blocks() -> None:
    assert all(page.is_file() for page in PAGES), [str(p) for p in PAGES if not p.is_file()]
    pages_with_blocks = {block.page for block in BLOCKS}
    # The README and every guide page show Python; a parser that found none would test nothing.
    assert ROOT / "README.md" in pages_with_blocks
    assert DOCS / "getting-started.md" in pages_with_blocks
    assert len(BLOCKS) >= 10, [block.name for block in BLOCKS]


def test_few_blocks_opt_out() -> None:
    opted_out = [block.name for block in BLOCKS if block.opt_out_reason is not None]
    assert len(opted_out) <= MAX_OPTED_OUT, opted_out


def test_parser_reads_fences() -> None:
    page = (
        "text\n\n```python\nx = 1\n```\n\n```bash\necho\n```\n\n"
        "  ```python\n  # not run by the docs test: why\n  ```\n"
    )
    path = ROOT / "README.md"
    blocks = []
    for match in FENCE.finditer(page):
        if match.group("info").strip() == "python":
            indent = len(match.group("indent"))
            blocks.append(Block(path, 0, "\n".join(x[indent:] for x in match.group("body").split("\n"))))
    assert [b.code for b in blocks] == ["x = 1\n", "# not run by the docs test: why\n"]
    assert blocks[0].opt_out_reason is None and blocks[1].opt_out_reason == "why"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_block_runs_alone(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = block.opt_out_reason
    if reason is not None:
        pytest.skip(f"{block.name} opts out: {reason}")
    monkeypatch.chdir(ROOT)
    code = compile(block.code, block.name, "exec")
    exec(code, {"__name__": "__docs_example__"})


def test_no_reference_to_files_outside_the_repository() -> None:
    """The repository is self-contained: no page or docstring sends readers to a file a clone lacks."""
    texts = {page: page.read_text(encoding="utf-8") for page in [*PAGES, *sorted(DOCS.rglob("*.md"))]}
    texts.update({path: path.read_text(encoding="utf-8") for path in sorted((ROOT / "python").rglob("*.py"))})
    pattern = re.compile(r"DESIGN\.md|\.\./shared")
    offending = [str(path.relative_to(ROOT)) for path, text in texts.items() if pattern.search(text)]
    assert offending == []


def test_docstrings_use_markdown_not_sphinx_roles() -> None:
    """The API reference renders docstrings as Markdown (mkdocstrings): a Sphinx role such as
    ``:class:`X` `` would show as literal text there; cross-references are ``[X][tiltsmc.X]``."""
    role = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`")
    offending = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "python").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if role.search(line)
    ]
    assert offending == []
