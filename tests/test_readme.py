"""The README's promises, checked for real so the README cannot rot.

`test_setup_section`: the "Set-up" section holds exactly two commands (install and start the proxy; install and run
the tests), and what they name exists: `scripts/test.sh` and the `kimi-rotate` console script.

`test_quickstart_runs`: every shell command of the README's fenced block whose first line is `# quickstart` runs, top
to bottom, in a temporary HOME (so mitmproxy's confdir, ~/.mitmproxy, and the CA live there) with KIMI_ROTATE_HOME
in a temporary folder too. The substitutions, all made here and none in the README:

- `.venv/bin/` becomes the folder of the interpreter running the tests (it holds the installed console scripts).
- `git clone` and the `cd` into the clone are checked, not run: the commands run in this checkout. Of the set-up
  command, the install part (`python3 -m venv .venv && .venv/bin/pip install -e .`) is checked to be there, not
  run: the tests already run in an installed environment.
- `kimi-rotate proxy` starts in the background on a free port (`--port N` appended); `127.0.0.1:8080` in the
  pasted lines becomes `127.0.0.1:N`, and `kimi-rotate doctor` gets `--port N` appended.
- The proxy starts twice. First exactly as typed (plus the port): it must print its keys per surface (so it opened
  the store) and stop cleanly on SIGINT; no request is sent to it, since it would go to the real Kimi. Then with
  `--set kimi_resolve=<host>=127.0.0.1:<fake port>` for each Kimi host and
  `--set ssl_verify_upstream_trusted_ca=<test CA>` appended: production options that send the Kimi host names to
  the fake upstream of tests/fakekimi.py and trust its certificate, so nothing leaves the machine. That second
  proxy serves the rest of the quick start.
- `add-key` reads an obviously fake key from stdin (as the README's hidden prompt would, piped); the fake knows it.
- curl gets `-w` appended so the status code can be checked.

The pasted lines must match what the proxy prints, the curl must get a 200 from the fake with the pooled key on it,
`list-keys` and `doctor` must exit 0, no output may hold the key, and the proxy must stop cleanly on SIGINT (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import KIMI_HOSTS, PROXY_ENV, STORE_SETTLE, platform_key

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent

SETUP_PROXY = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/kimi-rotate proxy"
SETUP_TESTS = "scripts/test.sh"
INSTALL_PART = "python3 -m venv .venv && .venv/bin/pip install -e . && "
README_PORT = "8080"
# Variables a developer's shell may carry that would change what the quick start does.
CLEAN_ENV = (*PROXY_ENV, "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
             "NODE_EXTRA_CA_CERTS", "KIMI_ROTATE_HOME")
SURFACES = ("moonshot-cn", "moonshot-ai", "kimi-code")
KEY = platform_key("readme")  # sk-test-readme-yyyy…: an Open Platform key only the fake upstream knows
START_TIMEOUT = 30.0


# -- reading the README --------------------------------------------------------------------------------------------


_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the `## <title>` section (up to the next `## ` heading)."""
    found = re.search(rf"^## {re.escape(title)}\b[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert found, f"README.md has no '## {title}' section"
    return found.group(1)


def commands(block: str) -> list[str]:
    """Shell commands of a code block: continuation lines joined, blank and comment lines dropped."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((pending + line).strip())
        pending = ""
    assert not pending, f"a command ends in a line continuation: {pending!r}"
    return out


def quickstart_block() -> str:
    blocks = [b for b in _FENCE.findall(readme_text()) if b.lstrip().startswith("# quickstart")]
    assert len(blocks) == 1, f"README.md needs exactly one code block starting with '# quickstart' ({len(blocks)})"
    return str(blocks[0])


# -- the set-up section --------------------------------------------------------------------------------------------


def test_setup_section() -> None:
    body = section(readme_text(), "Set-up")
    found = [cmd for block in _FENCE.findall(body) for cmd in commands(block)]
    assert found == [SETUP_PROXY, SETUP_TESTS], f"the Set-up section must hold exactly the two commands: {found}"

    script = REPO / "scripts" / "test.sh"
    assert script.is_file() and os.access(script, os.X_OK), "scripts/test.sh is missing or not executable"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"].get("kimi-rotate") == "kimi_rotator.cli:main"
    assert (BIN / "kimi-rotate").exists(), f"the kimi-rotate console script is not installed in {BIN}"


# -- the quick start -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _local(cmd: str) -> str:
    return cmd.replace(".venv/bin/", f"{BIN}/")


class Quickstart:
    """Runs the quick start's commands one by one, as a user in two terminals would."""

    def __init__(self, tmp: Path, fake_port: int, ca: Path) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.port = _free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        self.env.update(HOME=str(self.home), KIMI_ROTATE_HOME=str(tmp / "store"), PYTHONUNBUFFERED="1")
        self.upstream = [f"--set=kimi_resolve={h}=127.0.0.1:{fake_port}" for h in KIMI_HOSTS]
        self.upstream.append(f"--set=ssl_verify_upstream_trusted_ca={ca}")
        self.log = tmp / "proxy.log"
        self.typed_log = tmp / "proxy-as-typed.log"
        self.proxy: subprocess.Popen[bytes] | None = None
        self.clone_dir: str | None = None
        self.exports: list[str] = []
        self.outputs: list[str] = []
        self.key_added_at: float | None = None
        self.curl_statuses: list[int] = []

    # -- steps ---------------------------------------------------------------------------------------------------

    def run(self, cmd: str) -> None:
        words = shlex.split(cmd)
        if words[:2] == ["git", "clone"]:  # git clone URL [DIR]
            url = words[2]
            self.clone_dir = words[3] if len(words) > 3 else url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        elif words[0] == "cd":
            assert self.clone_dir is not None and words[1:] == [self.clone_dir], f"unexpected {cmd!r}"
        elif "kimi-rotate proxy" in cmd:
            self.start_proxy(cmd)
        elif words[0] == "export":
            self.exports.append(cmd.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{self.port}"))
        else:
            self.shell(cmd)

    def start_proxy(self, cmd: str) -> None:
        assert cmd == SETUP_PROXY, f"the quick start must use the set-up command as it is: {cmd!r}"
        assert cmd.startswith(INSTALL_PART)  # the install part: already done for the environment running the tests
        argv = [*shlex.split(_local(cmd.removeprefix(INSTALL_PART))), "--port", str(self.port)]
        # First exactly as typed (only the port differs): options given with --set change what a master configures,
        # so the proxy must prove it opens its store and reports the keys per surface without any.
        typed = self.launch(argv, self.typed_log)
        banner = self.proxy_log(self.typed_log)
        self.stop(typed)
        assert typed.returncode == 0, f"kimi-rotate proxy did not stop cleanly on SIGINT:\n{banner}"
        missing = [s for s in SURFACES if s not in banner]
        assert not missing, f"kimi-rotate proxy, started as the README says, reports no keys per surface:\n{banner}"
        # Then with the options that send the Kimi hosts to the fake upstream, for the rest of the quick start.
        self.proxy = self.launch([*argv, *self.upstream], self.log)

    def launch(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=REPO)
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in self.proxy_log(log):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(proc)
                raise AssertionError(f"kimi-rotate proxy did not start:\n{self.proxy_log(log)}")
            time.sleep(0.05)
        socket.create_connection(("127.0.0.1", self.port), 5).close()
        return proc

    def shell(self, cmd: str) -> None:
        line = _local(cmd)
        stdin = None
        words = shlex.split(cmd)
        if "add-key" in words:
            stdin = KEY + "\n"
        elif words[0] == "curl":
            # The proxy notices new keys within 0.2 s; a person takes longer than that to switch commands.
            if self.key_added_at is not None:
                time.sleep(max(0.0, self.key_added_at + STORE_SETTLE - time.monotonic()))
            line += " -w '\\nHTTP-STATUS %{http_code}\\n'"
        elif "doctor" in words:
            line += f" --port {self.port}"
        script = "set -eu\n" + "\n".join(self.exports) + "\n" + line
        result = subprocess.run(["bash", "-c", script], input=stdin, capture_output=True, text=True,
                                env=self.env, cwd=REPO, timeout=60, check=False)
        output = result.stdout + result.stderr
        self.outputs.append(output)
        assert result.returncode == 0, f"{cmd!r} exited {result.returncode}:\n{output}\nproxy log:\n{self.proxy_log()}"
        if "add-key" in words:
            self.key_added_at = time.monotonic()
        if words[0] == "curl":
            status = re.search(r"HTTP-STATUS (\d+)", result.stdout)
            assert status, f"no status from {cmd!r}:\n{output}"
            self.curl_statuses.append(int(status.group(1)))
            assert self.curl_statuses[-1] == 200, f"{cmd!r} got {status.group(1)}:\n{output}\n{self.proxy_log()}"

    # -- checks and teardown -------------------------------------------------------------------------------------

    def pasted(self) -> dict[str, str]:
        """The README's export lines as the shell sees them (after $HOME and quotes)."""
        names = [shlex.split(e)[1].partition("=")[0] for e in self.exports]
        script = "set -eu\n" + "\n".join(self.exports) + "\nprintf '%s\\0' " + " ".join(f'"${n}"' for n in names)
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=self.env, check=True)
        return dict(zip(names, out.stdout.split("\0")[:-1], strict=True))

    def printed(self) -> dict[str, str]:
        """The `export NAME=value` lines the proxy printed at start."""
        lines = [ln.strip() for ln in self.proxy_log().splitlines() if ln.strip().startswith("export ")]
        return dict(shlex.split(ln)[1].split("=", 1) for ln in lines)

    def proxy_log(self, log: Path | None = None) -> str:
        try:
            return (log or self.log).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes] | None = None) -> int | None:
        """Stops `proc` (default: the quick start's proxy) with SIGINT, as Ctrl-C would; its exit code."""
        proc = proc or self.proxy
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                return None
        return proc.returncode


@contextlib.contextmanager
def quickstart(tmp: Path, fake_port: int, ca: Path) -> Iterator[Quickstart]:
    qs = Quickstart(tmp, fake_port, ca)
    try:
        yield qs
    finally:
        qs.stop()


@pytest.mark.e2e
def test_quickstart_runs(tmp_path: Path, fake_kimi: Any, pki: Any) -> None:
    for tool in ("bash", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the quick start is a POSIX shell session and needs {tool}")
    steps = commands(quickstart_block())
    text = "\n".join(steps)
    for needed in ("git clone", SETUP_PROXY, "kimi-rotate add-key", "kimi-rotate ca", "export HTTPS_PROXY=",
                   "curl ", "kimi-rotate list-keys", "kimi-rotate doctor"):
        assert needed in text, f"the quick start lacks {needed!r}"
    # Everything the quick start fetches must be a Kimi host, which the test sends to the fake upstream.
    for step in steps:
        if step.startswith("git clone"):  # shown, never run
            continue
        for url in re.findall(r"https://[^\s\"']+", step):
            assert url.split("/")[2] in KIMI_HOSTS, f"the quick start reaches beyond the Kimi hosts: {url}"

    fake_kimi.add_key(KEY, account="readme", name="readme")
    with quickstart(tmp_path, fake_kimi.port, pki.ca_cert) as qs:
        for step in steps:
            qs.run(step)

        assert qs.proxy is not None, "the quick start never starts the proxy"
        assert qs.pasted() == qs.printed(), "the README's pasted lines differ from what `kimi-rotate proxy` prints"
        assert qs.curl_statuses, "the quick start sends no request through the proxy"
        served = fake_kimi.requests_for(KEY)
        assert served, "the request reached the upstream without the pooled key"
        assert all(s.sni in KIMI_HOSTS for s in served)
        code = qs.stop()
        assert code == 0, f"kimi-rotate proxy did not stop cleanly on SIGINT ({code}):\n{qs.proxy_log()}"

    for text_out in [*qs.outputs, qs.proxy_log(), qs.proxy_log(qs.typed_log)]:
        assert KEY not in text_out, "a command of the quick start printed the key"
