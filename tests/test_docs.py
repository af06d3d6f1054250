"""Docs stay honest: the hook reference is generated from the hookspecs,
every hook has a test through the network, every plugin has a page."""

from pathlib import Path

from gateway import hookspecs
from gateway._docgen import render
from gateway.plugins import installed

ROOT = Path(__file__).resolve().parent.parent


def test_hook_reference_is_up_to_date() -> None:
    assert (ROOT / "docs" / "hooks.md").read_text() == render(), (
        "run: python -m gateway._docgen > docs/hooks.md"
    )


def test_every_hook_is_documented_with_its_arguments() -> None:
    text = (ROOT / "docs" / "hooks.md").read_text()
    for name in hookspecs.__all__:
        assert f"## `{name}(" in text
        assert getattr(hookspecs, name).__doc__.count(":returns:") or name == "disconnect"


def test_every_installed_builtin_plugin_has_a_docs_page() -> None:
    for name, ep in installed().items():
        if ep.value.startswith("plugins."):
            page = ROOT / "docs" / "plugins" / f"{name}.md"
            assert page.exists(), f"docs/plugins/{name}.md is missing"
