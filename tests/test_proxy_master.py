"""The slim master: its addon manager (mitmproxy's dispatch, each event's handlers looked up once), the options its
`--set` takes or refuses, the web interface's address, and the line for a server that cannot listen."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, master, options
from mitmproxy import version as mitmproxy_version
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster

from kimi_rotator.proxy import (
    ON_DEMAND,
    REFUSED,
    CachedAddonManager,
    FlushSoon,
    ProxyConfig,
    ProxyError,
    build_master,
    listen_error,
    option_addons,
    web_address,
)


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


# -- what `kimi-rotate proxy` builds: the options it takes, the lines it prints on failing to listen ---------------


@pytest.fixture
def built(kimi_home: Path, mitm_confdir: Path) -> Iterator[Callable[..., master.Master]]:
    """`build_master(ProxyConfig(...))` on the running loop, with the test's store and the session's CA."""
    made: list[master.Master] = []

    def build(**config: Any) -> master.Master:
        sets = [f"confdir={mitm_confdir}", *config.pop("sets", ())]
        m = build_master(ProxyConfig(port=0, sets=sets, **config), asyncio.get_running_loop())
        made.append(m)
        return m

    yield build
    for m in made:
        m.addons.get("errorcheck").finish()  # its log filter and handler go, as once a proxy has started
        m.addons.get("kimirotate").done()


async def test_every_option_of_mitmdump_is_taken_or_refused(built: Callable[..., master.Master]) -> None:
    """The README says `--set` takes mitmproxy's options: each one mitmdump has either works here or is refused."""
    full = DumpMaster(options.Options(), with_termlog=False, with_dumper=True)
    slim = built()
    assert set(full.options.keys()) - set(slim.options.keys()) == set(ON_DEMAND) | set(REFUSED)


async def test_options_of_addons_left_out_load_them_when_set(built: Callable[..., master.Master], tmp_path: Path
                                                              ) -> None:
    samples = {"block_list": ":~d example.com:404", "anticache": "true", "anticomp": "true",
               "map_remote": "|example.com|example.org", "map_local": f"|example.com/x|{tmp_path}",
               "modify_body": "/~q/foo/bar", "modify_headers": "/~q/x-a/b", "stickyauth": ".", "stickycookie": ".",
               "save_stream_file": str(tmp_path / "flows"), "save_stream_filter": "~q",
               "hardump": str(tmp_path / "flows.har"), "keep_alt_svc_header": "true", "flow_detail": "2",
               "dumper_filter": "~q", "dumper_default_contentview": "raw"}
    assert set(samples) == set(ON_DEMAND)
    plain = built()
    m = built(sets=[f"{name}={value}" for name, value in samples.items()])
    names = [type(a).__name__ for a in m.addons.chain]
    for _module, cls, before in ON_DEMAND.values():
        assert names.count(cls) == 1 and cls not in [type(a).__name__ for a in plain.addons.chain]
        assert (names.index(cls) < names.index("KimiRotate")) is before, cls
    assert m.options.flow_detail == 2 and m.options.save_stream_filter == "~q"


async def test_quiet_turns_termlog_down_to_warnings(built: Callable[..., master.Master]) -> None:
    assert built().options.termlog_verbosity == "info"
    assert built(quiet=True).options.termlog_verbosity == "warn"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_option_says_why_and_what_to_use(name: str) -> None:
    with pytest.raises(ProxyError) as refused:
        option_addons(["flow_detail=1", f"{name}=x"])
    message = str(refused.value)
    assert message.startswith(f"--set {name} does not work with kimi-rotate proxy: ")
    assert re.search(r"use `[^`]+`|`kimi-rotate ca`", message), message


async def test_web_prints_the_interface_address_with_what_it_asks_for(built: Callable[..., master.Master]) -> None:
    m = built(web=True, sets=["web_port=18181", "flow_detail=2"])  # mitmweb has no flow printer: it is loaded
    assert m.options.flow_detail == 2
    address = web_address(m)
    assert address is not None
    if int(mitmproxy_version.VERSION.split(".")[0]) >= 12:  # mitmweb 12 wants the token it made up
        assert re.fullmatch(r"http://127\.0\.0\.1:18181/\?token=[0-9a-f]{32}", address), address
        m.options.update(web_password="mine")
        assert web_address(m) == "http://127.0.0.1:18181/   (log in with your web_password)"
    else:
        assert address == "http://127.0.0.1:18181/"
    assert web_address(built()) is None


@pytest.mark.parametrize(("host", "port", "error", "web", "line"), [
    ("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "in use"), False,
     "could not listen on 127.0.0.1:8080: the port is in use (another kimi-rotate proxy?); stop that, or pick "
     "another port with --port 8081"),
    ("127.0.0.1", 8081, OSError(errno.EADDRINUSE, "in use"), True,
     "could not listen on 127.0.0.1:8081 for the web interface: the port is in use (another mitmweb?); stop that, "
     "or pick another port with --set web_port=8082"),
    ("::1", 65535, OSError(errno.EADDRINUSE, "in use"), False,
     "could not listen on [::1]:65535: the port is in use (another kimi-rotate proxy?); stop that, or pick another "
     "port with --port 65534"),
    ("", 80, OSError(errno.EACCES, "denied"), False,
     "could not listen on 0.0.0.0:80: permission denied (ports below 1024 need administrator rights); pick another "
     "port with --port 8080"),
    ("10.9.9.9", 8080, OSError(errno.EADDRNOTAVAIL, "not here"), False,
     "could not listen on 10.9.9.9:8080: that address is not one of this machine's; pick one that is with --host "
     "127.0.0.1"),
    ("127.0.0.1", 99999, OverflowError("bind(): port must be 0-65535."), False,
     "could not listen on 127.0.0.1:99999: 99999 is not a port number; pick one from 1 to 65535, e.g. --port 8080"),
    ("127.0.0.1", 8080, OSError(errno.ENOBUFS, "No buffer space available"), False,
     "could not listen on 127.0.0.1:8080 (No buffer space available); pick another port with --port 8081"),
])
def test_a_server_that_cannot_listen_is_one_line_with_the_flag_to_use(
    host: str, port: int, error: BaseException, web: bool, line: str
) -> None:
    assert listen_error(host, port, error, web=web) == line


def test_the_readme_troubleshooting_row_is_what_a_port_in_use_prints() -> None:
    line = listen_error("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "in use"))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"| **`error: {line}`** |" in readme


class _CountingStream:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


async def test_lines_are_flushed_soon_once_per_burst_from_any_thread() -> None:
    import threading

    from kimi_rotator import proxy

    stream = _CountingStream()
    flusher = FlushSoon(asyncio.get_running_loop(), stream)  # type: ignore[arg-type]
    record = logging.LogRecord("kimi_rotate", logging.INFO, __file__, 1, "a line", None, None)
    for _ in range(3):
        flusher.handle(record)
    other = threading.Thread(target=flusher.handle, args=(record,))
    other.start()
    other.join()
    assert stream.flushes == 0  # not per line
    await asyncio.sleep(proxy.FLUSH_SECONDS + 0.1)
    assert stream.flushes == 1  # the burst in one write, a fraction of a second later
    other = threading.Thread(target=flusher.handle, args=(record,))  # a line from another thread, alone
    other.start()
    other.join()
    await asyncio.sleep(proxy.FLUSH_SECONDS + 0.1)
    assert stream.flushes == 2
