"""Docs that do not drift: the commands page is the parser's, the README stays short, every
relative link and anchor resolves, every module is described, and the repository cites only
its own files. Fast, and no Keras."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
README_LIMIT = 12_000
# Built so that this file does not contain them literally.
FORBIDDEN = ("DESIGN" + ".md", "STYLE" + ".md", ".." + "/shared")


def _commands_doc() -> ModuleType:
    path = REPO / "scripts" / "commands_doc.py"
    spec = importlib.util.spec_from_file_location("commands_doc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commands_page_is_generated_from_the_parser() -> None:
    expected = _commands_doc().render()
    current = (DOCS / "commands.md").read_text(encoding="utf8")
    assert current == expected, (
        "docs/commands.md is out of date: run python scripts/commands_doc.py"
    )


def test_commands_page_lists_every_command_and_option() -> None:
    from vggnorm.cli import build_parser

    text = (DOCS / "commands.md").read_text(encoding="utf8")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert f"## `vggnorm {name}`" in text
        for action in command._actions:
            for option in action.option_strings:
                assert f"`{option}" in text or f", {option}" in text, (name, option)


def test_readme_is_short() -> None:
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move details into docs/"


def _tracked_files(*extra: str) -> list[Path]:
    """The files git tracks (``extra``: more ``git ls-files`` options, e.g. new files too)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        [git, "ls-files", "-z", *extra], cwd=REPO, capture_output=True, check=True, timeout=60
    ).stdout
    return [REPO / name for name in out.decode("utf8").split("\0") if name]


def test_nothing_tracked_cites_files_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        data = path.read_bytes()
        offenders += [f"{path.relative_to(REPO)}: {s}" for s in FORBIDDEN if s.encode() in data]
    assert not offenders


# A repository path as code and docs cite it (a docs page, a script, a test, a fixture).
_CITED = re.compile(r"(?<![\w/.-])((?:docs|scripts|tests|fixtures|\.ci)/[\w./-]*\w)")


def test_every_file_the_repository_cites_exists() -> None:
    missing = []
    for path in _tracked_files("--cached", "--others", "--exclude-standard"):
        if not path.is_file() or path.suffix not in (".py", ".md", ".toml", ".txt", ""):
            continue
        text = path.read_text(encoding="utf8", errors="replace")
        for cited in sorted(set(_CITED.findall(text))):
            if not (REPO / cited).exists():
                missing.append(f"{path.relative_to(REPO)}: {cited}")
    assert not missing, missing


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without code blocks and code spans (brackets there are not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text(encoding="utf8")))


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(doc: Path) -> None:
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no such heading")
    assert not broken, broken


def test_every_module_is_described_in_the_architecture_page() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf8")
    package = REPO / "vggnorm"
    missing = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if path.name == "__init__.py" and path.parent != package and not path.read_text().strip():
            continue  # an empty subpackage marker
        if f"`{name}`" not in text:
            missing.append(name)
    assert not missing, f"docs/architecture.md does not describe {missing}"
