"""`kimi-rotate proxy`, `ca` and `doctor` as a new user runs them, and a Node client through the proxy."""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakekimi import Reply
from harness import (
    KC_CHAT,
    KC_MESSAGES,
    KIMI_ROTATE,
    MESSAGES_BODY,
    KeySpec,
    _clean_env,
    cli_keys,
    curl,
    kimi_key,
    prepare_pool,
    reset_store,
    stream_request,
    upstream_options,
)
from mitmproxy import version as mitmproxy_version

from kimi_rotator.store import HOME_ENV

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
KEY = kimi_key("s3tup")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CliProxy:
    """`kimi-rotate proxy` as a subprocess, reading its banner."""

    def __init__(self, home: Path, confdir: Path, sets: dict[str, object], extra: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        args = [str(KIMI_ROTATE), "proxy", *extra, "--port", str(self.port), "--set", f"confdir={confdir}"]
        for name, value in sets.items():
            for v in value if isinstance(value, list) else [value]:
                args += ["--set", f"{name}={v}"]
        self.proc = subprocess.Popen(
            args, env=_clean_env({HOME_ENV: str(home)}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.banner = self._read_banner()

    def _read_banner(self) -> str:
        assert self.proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if "REQUESTS_CA_BUNDLE" in line:
                return "".join(lines)
        self.proc.kill()
        raise AssertionError("the proxy did not print its banner:\n" + "".join(lines))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def output_after_banner(self) -> str:
        """Everything printed after the banner, once stopped (the lines are few: the pipe never fills)."""
        self.stop()
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode()

    def client(self, ca: Path) -> httpx.Client:
        return httpx.Client(proxy=self.url, verify=ssl.create_default_context(cafile=str(ca)), trust_env=False,
                            timeout=30)


@pytest.fixture
def cli_proxy(tmp_path: Path, pki, fake_kimi_server) -> Iterator[tuple[CliProxy, Path, Path]]:
    home, confdir = tmp_path / "home", tmp_path / "conf"
    reset_store(home, [KeySpec(KEY, "one")])
    fake_kimi_server.reset()
    fake_kimi_server.add_key(KEY, account="s", name="one")
    proxy = CliProxy(home, confdir, upstream_options(fake_kimi_server.port, pki.ca_cert))
    yield proxy, home, confdir
    proxy.stop()


def test_proxy_serves_end_to_end_and_stops_cleanly_with_outcomes_stored(cli_proxy, fake_kimi_server):
    proxy, home, confdir = cli_proxy
    assert f"listening on {proxy.url}" in proxy.banner
    assert "kimi-code 1" in proxy.banner
    assert f"export HTTPS_PROXY={proxy.url}" in proxy.banner
    assert str(confdir / "mitmproxy-ca-cert.pem") in proxy.banner

    r = curl(proxy.url, "https://api.kimi.com/coding/v1/messages", ca=confdir / "mitmproxy-ca-cert.pem",
             headers={"x-api-key": "placeholder"}, body={"model": "kimi-for-coding", "max_tokens": 8, "messages": []})
    assert r.status == 200, r
    assert r.json()["content"][0]["text"] == "ok one"
    assert fake_kimi_server.requests[-1].credential == KEY

    assert proxy.stop() == 0
    key = cli_keys(home)["one"]
    assert (key["total_requests"], key["successful_requests"]) == (1, 1)


def test_proxy_with_web_shows_kimi_flows_in_mitmweb(tmp_path: Path, pki, fake_kimi_server):
    home, confdir, web_port = tmp_path / "home", tmp_path / "conf", _free_port()
    reset_store(home, [KeySpec(KEY, "one")])
    fake_kimi_server.reset()
    fake_kimi_server.add_key(KEY, account="s", name="one")
    sets: dict[str, object] = {**upstream_options(fake_kimi_server.port, pki.ca_cert), "web_port": web_port}
    auth: dict[str, str] = {}
    if int(mitmproxy_version.VERSION.split(".")[0]) >= 12:  # mitmweb 12 asks for a password (a token by default)
        sets["web_password"] = "web-test-password"
        auth = {"Authorization": "Bearer web-test-password"}
    proxy = CliProxy(home, confdir, sets, extra=("--web",))
    try:
        r = curl(proxy.url, "https://api.kimi.com/coding/v1/chat/completions", ca=confdir / "mitmproxy-ca-cert.pem",
                 headers={"authorization": "Bearer placeholder"}, body={"model": "kimi-for-coding", "messages": []})
        assert r.status == 200, r
        request = urllib.request.Request(f"http://127.0.0.1:{web_port}/flows", headers=auth)
        with urllib.request.urlopen(request, timeout=10) as answer:
            flows = json.load(answer)
    finally:
        assert proxy.stop() == 0
    [flow] = [f for f in flows if f["request"]["path"] == "/coding/v1/chat/completions"]
    assert flow["response"]["status_code"] == 200
    assert flow["comment"].startswith("one sk-kimi-…") and flow["comment"].endswith(": 200")
    headers = dict((k.lower(), v) for k, v in flow["request"]["headers"])
    assert headers["authorization"].startswith("Bearer kimi-rotate:")  # the placeholder, never the key
    assert KEY not in json.dumps(flows)


def test_proxy_with_web_prints_the_address_of_the_web_interface(tmp_path: Path):
    """On mitmproxy 12 the interface wants the token it made up at start: the printed address carries it."""
    web_port = _free_port()
    proxy = CliProxy(tmp_path / "home", tmp_path / "conf", {"web_port": web_port}, extra=("--web",))
    try:
        [url] = re.findall(r"^Web interface: (\S+)$", proxy.banner, re.MULTILINE)
        assert url.startswith(f"http://127.0.0.1:{web_port}/")
        with urllib.request.urlopen(url, timeout=10) as answer:  # a 403 would raise
            assert answer.status == 200
        if int(mitmproxy_version.VERSION.split(".")[0]) >= 12:
            assert re.fullmatch(rf"http://127\.0\.0\.1:{web_port}/\?token=\w+", url)
    finally:
        assert proxy.stop() == 0


ONE, TWO, THREE = kimi_key("0a01"), kimi_key("0a02"), kimi_key("0a03")
TRIO = [KeySpec(ONE, "first", account="acct-1"), KeySpec(TWO, "second", account="acct-2"),
        KeySpec(THREE, "third", account="acct-3")]
MASKED = {spec.secret: f"{spec.name} sk-kimi-…{spec.secret[-4:]}" for spec in TRIO}


def _leaks(output: str) -> list[str]:
    return [s.name for s in TRIO if s.secret in output or s.secret.split("-", 2)[-1] in output]


def test_proxy_prints_a_line_per_request_and_per_key_state_change(tmp_path: Path, pki, fake_kimi_server):
    fake = fake_kimi_server
    fake.reset()
    home, confdir = tmp_path / "home", tmp_path / "conf"
    options = prepare_pool(fake, pki.ca_cert, home, TRIO)
    proxy = CliProxy(home, confdir, {**options, "kimi_max_wait": 0})
    ca = confdir / "mitmproxy-ca-cert.pem"
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])
    assert curl(proxy.url, KC_CHAT + "?secret=query", ca=ca, headers={"authorization": "Bearer placeholder"},
                body={"model": "kimi-for-coding", "messages": [{"role": "user", "content": "private words"}]}
                ).status == 200  # one: 429 → two: 200
    # A second conversation goes to the account with none yet (three), while the first stays on two.
    fake.script(THREE, [Reply.invalid()])
    started = time.monotonic()
    with proxy.client(ca) as client:
        streamed = stream_request(client, KC_MESSAGES, body={**MESSAGES_BODY, "stream": True},
                                  headers={"x-api-key": "placeholder"})  # three: 401 → two: 200, streamed
    stream_took = time.monotonic() - started
    assert streamed.status == 200 and len(streamed.data_lines) >= 5
    output = proxy.output_after_banner()
    one, two, three = MASKED[ONE], MASKED[TWO], MASKED[THREE]

    lines = output.splitlines()
    assert any(re.fullmatch(rf"\[[\d:.]+\] kimi-code POST /coding/v1/chat/completions {two} 200 \d+ ms "
                            rf"\({one}: 429 rate_limit_reached_error, account cooling (59|60) s → {two}: 200\)", line)
               for line in lines), output
    [stream_line] = [line for line in lines if "/coding/v1/messages" in line]
    found = re.fullmatch(rf"\[[\d:.]+\] kimi-code POST /coding/v1/messages {two} 200 (\d+) ms "
                         rf"\({three}: 401 \w+, disabled → {two}: 200\)", stream_line)
    assert found, stream_line
    assert 0.4 <= int(found.group(1)) / 1000 <= stream_took + 0.05  # the whole stream (5 events 0.1 s apart)
    assert any(re.fullmatch(rf"\[[\d:.]+\] key {one} cooling until \d\d:\d\d:\d\d \((59|60) s\): "
                            r"429 rate_limit_reached_error", line) for line in lines), output
    assert any(re.fullmatch(rf"\[[\d:.]+\] key {three} disabled: 401 \w+; once it works again, "
                            r"`kimi-rotate enable third` puts it back", line) for line in lines), output
    assert "secret=query" not in output and "private words" not in output and "ok second" not in output
    assert _leaks(output) == []
    assert "client connect" not in output  # mitmproxy's own lines per connection stay out of the way


def test_a_request_line_reaches_a_pipe_while_the_proxy_runs(cli_proxy):
    """stdout is block-buffered for speed; the line must still show soon to whoever reads the pipe."""
    proxy, _, confdir = cli_proxy
    assert proxy.proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(b.decode()) for b in proxy.proc.stdout], daemon=True).start()
    assert curl(proxy.url, KC_CHAT, ca=confdir / "mitmproxy-ca-cert.pem", headers={"authorization": "Bearer x"},
                body={"model": "kimi-for-coding", "messages": []}).status == 200
    answered = time.monotonic()
    while (left := answered + 1.0 - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if "kimi-code POST /coding/v1/chat/completions" in line:
            assert " 200 " in line, line
            return
    raise AssertionError("no request line within 1 s of the answer")


def test_proxy_quiet_keeps_only_what_needs_the_user(tmp_path: Path, pki, fake_kimi_server):
    fake = fake_kimi_server
    fake.reset()
    home, confdir = tmp_path / "home", tmp_path / "conf"
    options = prepare_pool(fake, pki.ca_cert, home, TRIO)
    proxy = CliProxy(home, confdir, {**options, "kimi_max_wait": 0}, extra=("--quiet",))
    fake.script(ONE, [Reply.invalid()])
    fake.script(TWO, [Reply.rate_limit(retry_after=60)])
    assert curl(proxy.url, KC_CHAT, ca=confdir / "mitmproxy-ca-cert.pem", headers={"authorization": "Bearer x"},
                body={"model": "kimi-for-coding", "messages": []}).status == 200  # one: 401 → two: 429 → three
    output = proxy.output_after_banner()
    assert re.search(rf"\] key {MASKED[ONE]} disabled: 401 \w+; once it works again", output), output
    assert "kimi-code POST" not in output and "cooling until" not in output, output


def test_proxy_set_flow_detail_loads_mitmproxy_flow_printer(tmp_path: Path, pki, fake_kimi_server):
    fake = fake_kimi_server
    fake.reset()
    home, confdir = tmp_path / "home", tmp_path / "conf"
    options = prepare_pool(fake, pki.ca_cert, home, TRIO[:1])
    saved = tmp_path / "flows.mitm"
    proxy = CliProxy(home, confdir, {**options, "flow_detail": 1, "save_stream_file": saved})
    assert curl(proxy.url, KC_CHAT, ca=confdir / "mitmproxy-ca-cert.pem", headers={"authorization": "Bearer x"},
                body={"model": "kimi-for-coding", "messages": []}).status == 200
    output = proxy.output_after_banner()
    flow_printed = r"POST https://api\.kimi\.com/coding/v1/chat/completions[^\n]*\n\s+<< [^\n]*200 OK"
    assert re.search(flow_printed, output), output
    assert saved.stat().st_size > 0 and _leaks(saved.read_text("latin-1")) == [] and _leaks(output) == []


def test_proxy_refuses_an_option_it_has_no_part_for_and_says_what_to_use(tmp_path: Path):
    env = _clean_env({HOME_ENV: str(tmp_path / "home")})
    r = subprocess.run([str(KIMI_ROTATE), "proxy", "--port", str(_free_port()), "--set", "server_replay=flows.mitm"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == ("error: --set server_replay does not work with kimi-rotate proxy: replaying flows is not part "
                        "of the rotating proxy: use `mitmdump -s kimi_rotate.py` (-C or -S FILE)\n")


def _start_error(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = _clean_env({HOME_ENV: str(tmp_path / "home")})
    return subprocess.run([str(KIMI_ROTATE), "proxy", "--confdir", str(tmp_path / "conf"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_port_in_use_ends_in_one_line_naming_the_port_and_the_flag(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _start_error(tmp_path, "--port", str(port))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"error: could not listen on 127.0.0.1:{port}: the port is in use (another kimi-rotate "
                        f"proxy?); stop that, or pick another port with --port {port + 1}\n")


def test_the_proxy_started_twice_says_so_in_one_line(cli_proxy, tmp_path: Path):
    proxy, _home, _confdir = cli_proxy
    r = _start_error(tmp_path, "--port", str(proxy.port))
    assert r.returncode == 1
    assert r.stderr == (f"error: could not listen on 127.0.0.1:{proxy.port}: the port is in use (another "
                        f"kimi-rotate proxy?); stop that, or pick another port with --port {proxy.port + 1}\n")
    assert "--mode" not in r.stdout + r.stderr and "Error logged during startup" not in r.stderr


def test_a_web_port_in_use_names_the_web_option(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web_port = taken.getsockname()[1]
        r = _start_error(tmp_path, "--web", "--port", str(_free_port()), "--set", f"web_port={web_port}")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"error: could not listen on 127.0.0.1:{web_port} for the web interface: the port is in use "
                        f"(another mitmweb?); stop that, or pick another port with --set web_port={web_port + 1}\n")


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_out_of_range_is_refused_before_anything_starts(tmp_path: Path, port: str):
    r = _start_error(tmp_path, "--port", port)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == f"error: --port {port} is not a port number; pick one from 1 to 65535, e.g. --port 8080\n"


def test_proxy_with_no_keys_starts_and_says_how_to_add_one(tmp_path: Path):
    proxy = CliProxy(tmp_path / "home", tmp_path / "conf", {})
    try:
        assert "No keys yet: add one with `kimi-rotate add-key`" in proxy.banner
    finally:
        assert proxy.stop() == 0


def test_proxy_refuses_a_non_loopback_address_without_protection(tmp_path: Path):
    env = _clean_env({HOME_ENV: str(tmp_path / "home")})
    r = subprocess.run([str(KIMI_ROTATE), "proxy", "--host", "0.0.0.0", "--port", str(_free_port()),
                        "--set", f"confdir={tmp_path / 'conf'}"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "refusing to listen on 0.0.0.0" in r.stderr and "kimi_client_token" in r.stderr
    assert "Traceback" not in r.stderr


def test_proxy_reports_a_bad_set_option_without_a_traceback(tmp_path: Path):
    env = _clean_env({HOME_ENV: str(tmp_path / "home")})
    r = subprocess.run([str(KIMI_ROTATE), "proxy", "--port", str(_free_port()), "--set", "no_such_option=1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "no_such_option" in r.stderr and "Traceback" not in r.stderr


def test_ca_creates_the_ca_and_the_bundle_in_a_fresh_folder(tmp_path: Path):
    confdir = tmp_path / "conf"
    r = subprocess.run([str(KIMI_ROTATE), "ca", "--confdir", str(confdir)], env=_clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cert = confdir / "mitmproxy-ca-cert.pem"
    assert "Created the CA certificate" in r.stdout and str(cert) in r.stdout
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    bundle = (confdir / "kimi-rotate-ca-bundle.pem").read_bytes()
    assert bundle.endswith(cert.read_bytes()) and bundle.count(b"BEGIN CERTIFICATE") > 10
    again = subprocess.run([str(KIMI_ROTATE), "ca", "--confdir", str(confdir)], env=_clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert "Found the CA certificate" in again.stdout


def _doctor(home: Path, confdir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KIMI_ROTATE), "doctor", "--port", str(port), "--confdir", str(confdir)],
                          env=_clean_env({HOME_ENV: str(home)}), capture_output=True, text=True, timeout=60)


def test_doctor_passes_on_a_good_setup(cli_proxy):
    proxy, home, confdir = cli_proxy
    r = _doctor(home, confdir, proxy.port)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("✓") == 5 and "All checks passed." in r.stdout


def test_doctor_names_each_broken_part(cli_proxy, tmp_path: Path):
    proxy, home, confdir = cli_proxy
    # Safe permissions are part of the store check.
    (home / "store.db").chmod(0o644)
    r = _doctor(home, confdir, proxy.port)
    assert r.returncode == 1 and "✗ store: permissions too open" in r.stdout and "chmod 600" in r.stdout
    (home / "store.db").chmod(0o600)

    empty = tmp_path / "empty-home"
    r = _doctor(empty, confdir, proxy.port)
    assert r.returncode == 1 and "✗ keys: no keys in the store" in r.stdout and "kimi-rotate add-key" in r.stdout

    other_conf = tmp_path / "other-conf"
    other_conf.mkdir()
    r = _doctor(home, other_conf, proxy.port)
    assert r.returncode == 1 and "✗ CA: no CA certificate" in r.stdout and "kimi-rotate ca" in r.stdout

    # A CA that is not the one the proxy signs with: the handshake must not validate.
    subprocess.run([str(KIMI_ROTATE), "ca", "--confdir", str(other_conf)], env=_clean_env(), check=True,
                   capture_output=True, timeout=60)
    r = _doctor(home, other_conf, proxy.port)
    assert r.returncode == 1 and "✗ TLS:" in r.stdout and "not signed by" in r.stdout

    r = _doctor(home, confdir, _free_port())
    assert r.returncode == 1 and "✗ proxy: nothing usable" in r.stdout and "kimi-rotate proxy" in r.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (scripts/test.sh installs the rest)")
def test_node_openai_client_through_the_proxy(cli_proxy, fake_kimi_server):
    """The openai npm package, as a VS Code extension calls Kimi, trusting the CA via NODE_EXTRA_CA_CERTS."""
    node_dir = REPO / "tests" / "node"
    if not (node_dir / "node_modules" / "openai").is_dir():
        pytest.skip("tests/node has no node_modules: run scripts/test.sh (it runs npm install there)")
    proxy, _home, confdir = cli_proxy
    env = _clean_env({"NODE_EXTRA_CA_CERTS": str(confdir / "mitmproxy-ca-cert.pem")})
    env.pop("SSL_CERT_FILE", None)
    for mode, events in (("plain", 0), ("stream", 5)):
        r = subprocess.run(["node", "chat.mjs", "https://api.kimi.com/coding/v1", proxy.url, mode], cwd=node_dir,
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["text"].startswith("ok one")
        if events:
            assert out["events"] >= events
    assert all(seen.credential == KEY for seen in fake_kimi_server.requests)
