"""Generates docs/hooks.md from gateway/hookspecs.py, so the hook reference
is written once (``python -m gateway._docgen > docs/hooks.md``); a test
fails when the file is out of date."""

from __future__ import annotations

import inspect

from . import hookspecs


def render() -> str:
    out = [
        "# Hook reference",
        "",
        "<!-- Generated from gateway/hookspecs.py by `python -m gateway._docgen > docs/hooks.md`. Do not edit. -->",
        "",
        inspect.cleandoc(hookspecs.__doc__ or ""),
        "",
    ]
    for name in hookspecs.__all__:
        fn = getattr(hookspecs, name)
        signature = inspect.signature(fn)
        out += [f"## `{name}{signature}`".replace("'", ""), "", inspect.cleandoc(fn.__doc__ or ""), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
