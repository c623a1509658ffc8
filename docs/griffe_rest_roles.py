"""A griffe extension for the API reference: reST markup in docstrings, read as Markdown.

The package's docstrings are prose written for ``help()`` and Sphinx habits: roles such as
``:func:`write_report``` and literal blocks introduced by ``::``. mkdocstrings renders
docstrings as Markdown, where a role would show as ``:func:`` followed by code. This extension
rewrites each role to a code span (``~a.b.c`` to ``c``, as Sphinx shows it) and a closing
``::`` to ``:``, so the indented block after it is Markdown's code block. The source files are
not touched. mkdocs.yml loads it through the python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|mod|class|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")
LITERAL_INTRO = re.compile(r"(\S)::$", re.MULTILINE)
LONE_LITERAL_INTRO = re.compile(r"^(\s*)::$", re.MULTILINE)


def _role_to_code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def markdown_from_rest(text: str) -> str:
    """The docstring with reST roles as code spans and ``::`` literal intros as ``:``."""
    text = ROLE.sub(_role_to_code, text)
    text = LITERAL_INTRO.sub(r"\1:", text)
    return LONE_LITERAL_INTRO.sub("", text)


class RestRoles(griffe.Extension):
    """Rewrite every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_from_rest(obj.docstring.value)
