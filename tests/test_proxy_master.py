"""The slim master's addon manager: the same dispatch as mitmproxy's, with each event's handlers looked up once."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest
from mitmproxy import exceptions, hooks, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow

from kimi_rotator.proxy import CachedAddonManager


@dataclass
class Recorder:
    name: str
    seen: list[str]

    def request(self, flow: object) -> None:
        self.seen.append(f"{self.name}.request")


class AsyncRecorder(Recorder):
    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)
        self.seen.append(f"{self.name}.request")


class Failing(Recorder):
    def request(self, flow: object) -> None:
        raise RuntimeError("boom in a hook")


class Halting(Recorder):
    def request(self, flow: object) -> None:
        self.seen.append(f"{self.name}.halt")
        raise exceptions.AddonHalt


class Parent:
    """An addon with children, as mitmproxy's `addons` attribute nests them."""

    def __init__(self, seen: list[str]) -> None:
        self.addons = [Recorder("child", seen)]


@pytest.fixture
async def manager() -> CachedAddonManager:
    m = master.Master(options.Options())
    m.addons = CachedAddonManager(m)
    return m.addons


async def fire(manager: CachedAddonManager) -> None:
    await manager.handle_lifecycle(HttpRequestHook(tflow.tflow()))


async def test_handlers_run_in_chain_order_with_children_and_async_ones(manager: CachedAddonManager) -> None:
    seen: list[str] = []
    manager.add(Recorder("a", seen), Parent(seen), AsyncRecorder("b", seen))
    await fire(manager)
    assert seen == ["a.request", "child.request", "b.request"]


async def test_the_cache_follows_addons_added_and_removed(manager: CachedAddonManager) -> None:
    seen: list[str] = []
    first = Recorder("a", seen)
    manager.add(first)
    await fire(manager)
    manager.add(Recorder("b", seen))
    await fire(manager)
    manager.remove(first)
    await fire(manager)
    parent = Parent(seen)
    manager.add(parent)
    await fire(manager)
    late_child = Recorder("late", seen)  # an addon that manages children registers them itself
    parent.addons.append(late_child)
    manager.register(late_child)
    await fire(manager)
    assert seen == ["a.request", "a.request", "b.request", "b.request", "b.request", "child.request",
                    "b.request", "child.request", "late.request"]


async def test_a_failing_handler_is_logged_and_the_event_goes_on(
    manager: CachedAddonManager, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    manager.add(Failing("bad", seen), Recorder("after", seen))
    with caplog.at_level(logging.ERROR):
        await fire(manager)
    assert seen == ["after.request"]
    assert any("Addon error: boom in a hook" in r.getMessage() for r in caplog.records)


async def test_addon_halt_stops_the_event(manager: CachedAddonManager) -> None:
    seen: list[str] = []
    manager.add(Halting("stop", seen), Recorder("never", seen))
    await fire(manager)
    assert seen == ["stop.halt"]


async def test_handlers_are_looked_up_once_per_event_name(manager: CachedAddonManager) -> None:
    seen: list[str] = []
    manager.add(Recorder("a", seen))
    event = HttpRequestHook(tflow.tflow())
    assert manager.handlers(event) is manager.handlers(event)
    assert manager.handlers(hooks.UpdateHook([])) == []  # nobody listens: each flow event's follow-up costs nothing
