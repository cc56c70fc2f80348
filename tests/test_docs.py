"""Documentation: every public name has a docstring with an example, every example runs, every
relative link of the Markdown documents points at a file that exists.

The docstrings are read with griffe, the library the API reference (``mkdocs.yml``) is built
with, so what is checked here is what the reference shows; ``scripts/docs.sh`` builds the
reference itself with ``mkdocs build --strict``.
"""

from __future__ import annotations

import doctest
import importlib.util
import re
import textwrap
from pathlib import Path

import griffe
import pytest

import factorize

ROOT = Path(__file__).resolve().parents[1]
_EXAMPLE = re.compile(r"^(\s*)Examples?::\s*$")


@pytest.fixture(scope="module")
def package():
    return griffe.load("factorize", search_paths=[str(ROOT)])


def example_blocks(doc: str) -> list[str]:
    """The code of every ``Example::`` literal block in ``doc``, dedented."""
    lines = doc.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = _EXAMPLE.match(line)
        if not m:
            continue
        indent, body = len(m.group(1)), []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def _namespace() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    return dict(jax=jax, jnp=jnp, np=np, nnx=nnx, factorize=factorize)


def test_example_blocks_are_found():
    doc = "Summary.\n\nExample::\n\n    a = 1\n    b = a + 1\n\nAfter the block.\n"
    assert example_blocks(doc) == ["a = 1\nb = a + 1"]
    assert example_blocks("Example: inline, no block") == []


@pytest.mark.parametrize("name", factorize.__all__)
def test_public_name_has_a_docstring_with_an_example(package, name):
    doc = package[name].docstring
    assert doc is not None and doc.value.strip(), f"factorize.{name} has no docstring"
    assert example_blocks(doc.value) or ">>>" in doc.value, (
        f"factorize.{name}'s docstring has no Example:: block or doctest")


@pytest.mark.parametrize("name", factorize.__all__)
def test_public_examples_run(package, name):
    """Each example runs as written, given only the imports every example assumes
    (jax, jax.numpy as jnp, numpy as np, flax's nnx, factorize)."""
    doc = package[name].docstring.value
    for code in example_blocks(doc):
        exec(compile(code, f"<factorize.{name} example>", "exec"), _namespace())
    if ">>>" in doc:
        test = doctest.DocTestParser().get_doctest(doc, _namespace(), name, None, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0, f"factorize.{name}'s doctest failed"


def _markdown_documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in docs if p.exists()]


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("doc", _markdown_documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)  # code is not links
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_griffe_extension_turns_sphinx_markup_into_markdown():
    spec = importlib.util.spec_from_file_location("griffe_rst", ROOT / "scripts" / "griffe_rst.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = "See :func:`decompose`, :class:`~factorize.Factorized`.\n\n    Example::\n"
    assert mod.markdown(text) == "See `decompose`, `Factorized`.\n\n    **Example**\n"
