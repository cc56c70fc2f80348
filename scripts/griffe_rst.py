"""A griffe extension for the API reference (mkdocs.yml): the docstrings are written for
``help()`` and Sphinx-style readers (``:func:`x```, ``Example::`` literal blocks); mkdocstrings
renders Markdown, so the roles become code spans and ``Example::`` a bold label before the
indented code block."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"^([ \t]*)(Examples?)::[ \t]*$", re.MULTILINE)


def markdown(text: str) -> str:
    """``text`` with Sphinx roles as code spans and ``Example::`` as a bold label."""
    # `~a.b.c` shows as `c`, as Sphinx does
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`",
                     text)
    return _LITERAL.sub(r"\1**\2**", text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
