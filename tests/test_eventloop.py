import asyncio

import pytest

from gateway import eventloop

uvloop = pytest.importorskip("uvloop")


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_prefers_uvloop_when_installed() -> None:
    assert eventloop.resolve("auto") == "uvloop"
    assert eventloop.run(_loop_type(), "auto") == "uvloop"


def test_auto_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "available", lambda: False)
    assert eventloop.resolve("auto") == "asyncio"
    assert eventloop.run(_loop_type(), "auto").startswith("asyncio")


def test_explicit_choices() -> None:
    assert eventloop.run(_loop_type(), "asyncio").startswith("asyncio")
    assert eventloop.run(_loop_type(), "uvloop") == "uvloop"
