"""Fixtures shared by the test modules. Keep this small: module-specific helpers live in their module."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from kimi_rotator.store import HOME_ENV, Store
from kimi_rotator.store_sqlite import SqliteStore

# CI explores a fixed set of examples, so a run cannot fail on a case no earlier run met; local runs keep drawing new
# ones (that is where the property tests find bugs), and a failure prints the blob to reproduce it.
# No example database either: .ci/run runs two Python lines at once in one checkout.
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The real Redis's fixtures (redis_server, redis_url, private_redis_server), for every module without an import that
# ruff would see as unused.
pytest_plugins = ("redis_server",)


@pytest.fixture
def kimi_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private store folder (not created yet) that KIMI_ROTATE_HOME points at for the test's duration."""
    home = tmp_path / "kimi-home"
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture
def store(kimi_home: Path) -> Iterator[Store]:
    """An open, empty store in `kimi_home`."""
    s = SqliteStore(kimi_home)
    yield s
    s.close()


# -- end-to-end fixtures (tests/harness.py; see tests/test_e2e_*.py) -------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):  # -> certs.TestPKI
    """The test CA and the fake upstream's certificate (api.kimi.com, api.moonshot.*, echo.test, 127.0.0.1)."""
    from certs import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def mitm_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mitmproxy confdir (and so one mitmproxy CA) for every proxy of the session, created up front."""
    from harness import ensure_mitm_ca

    confdir = tmp_path_factory.mktemp("mitmproxy-conf")
    ensure_mitm_ca(confdir)
    return confdir


@pytest.fixture(scope="module")
def fake_kimi_server(pki):  # -> Iterator[fakekimi.FakeKimi]
    """A fake Kimi upstream shared by a module: 5 SSE events 0.1 s apart. Use `fake_kimi` in tests."""
    from fakekimi import FakeKimi

    with FakeKimi(pki, events=5, interval=0.1) as fake:
        yield fake


@pytest.fixture
def fake_kimi(fake_kimi_server):  # -> fakekimi.FakeKimi
    """The module's fake upstream with requests, scripts, faults and limits forgotten (keys kept)."""
    fake_kimi_server.reset()
    return fake_kimi_server


@pytest.fixture(scope="module")
def echo_server(pki):  # -> Iterator[fakekimi.FakeKimi]
    """An HTTPS echo server (the fake in echo mode) standing for any non-Kimi host."""
    from fakekimi import FakeKimi

    with FakeKimi(pki, echo=True) as echo:
        yield echo


class ProxyFactory:
    """Starts ProxyProcess instances in their own folders and stops them all at teardown."""

    def __init__(self, root: Path, confdir: Path) -> None:
        self.root = root
        self.confdir = confdir
        self.started: list = []

    def home(self, name: str = "home") -> Path:
        return self.root / name

    def __call__(self, home: Path, options=(), **kw):  # -> harness.ProxyProcess
        from harness import ProxyProcess

        workdir = self.root / f"proxy{len(self.started)}"
        proxy = ProxyProcess(workdir, home, options, confdir=self.confdir, **kw)
        self.started.append(proxy)
        return proxy.start()

    def close(self) -> None:
        for proxy in reversed(self.started):
            proxy.stop()


@pytest.fixture
def proxy_factory(tmp_path: Path, mitm_confdir: Path) -> Iterator[ProxyFactory]:
    """`proxy_factory(home, {"kimi_max_wait": 0, ...}, dump=..., sinks=...)` → a running ProxyProcess, stopped after
    the test."""
    factory = ProxyFactory(tmp_path, mitm_confdir)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_proxy_factory(tmp_path_factory: pytest.TempPathFactory, mitm_confdir: Path) -> Iterator[ProxyFactory]:
    """As `proxy_factory`, but the proxies live for the whole module (reset the store between tests)."""
    factory = ProxyFactory(tmp_path_factory.mktemp("proxies"), mitm_confdir)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def clients_python() -> Path:
    """The interpreter that runs tests/clients/*.py (openai and anthropic SDKs, kept apart from mitmproxy's pins):
    $KIMI_TEST_CLIENTS_PYTHON, else <repo>/.venv-clients/bin/python; the SDK tests skip when neither exists."""
    import os

    env = os.environ.get("KIMI_TEST_CLIENTS_PYTHON")
    candidate = Path(env) if env else Path(__file__).resolve().parent.parent / ".venv-clients" / "bin" / "python"
    if not candidate.exists():
        pytest.skip(f"no clients interpreter at {candidate}: run `scripts/test.sh`, which creates .venv-clients "
                    "with the openai and anthropic SDKs (or set KIMI_TEST_CLIENTS_PYTHON)")
    return candidate


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC for the test, so the clock times that views print are predictable."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
