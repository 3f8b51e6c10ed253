"""benchmarks/goodput.py cannot rot: a 3-second reactive run prints its table, the quota phase measures what quota
awareness changes, and its parts read what they must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "goodput.py"
sys.path.insert(0, str(SCRIPT.parent))

import goodput  # noqa: E402


def test_queue_waits_read_the_proxy_request_lines() -> None:
    log = "\n".join([
        "[12:00:00.100] moonshot-cn POST /v1/chat/completions key-1 sk-…0001 200 1012 ms (queued 1.234 s)",
        "[12:00:00.200] moonshot-cn POST /anthropic/v1/messages key-2 sk-…0002 200 980 ms",
        "[12:00:00.300] moonshot-cn POST /v1/chat/completions no key 429 3001 ms (queued 3.000 s)",
        "[12:00:00.400] key key-3 cooling until 12:00:01 (1 s): 429 rate_limit_reached_error",
        "[12:00:00.500] moonshot-cn GET /v1/models key-1 sk-…0001 200 3 ms",
    ])
    assert goodput.queue_waits(log) == [1.234, 0.0, 3.0]


def test_capacity_is_what_the_caps_admit_in_the_run() -> None:
    caps = goodput.parse_caps("60/4,60/4,600/1,600/1")
    assert goodput.capacity(caps, 60, 1.0) == 240  # 4 accounts x 1/s, RPM-bound twice, concurrency-bound twice
    assert goodput.capacity(caps, 10, 1.0) == 2 * 40 + 2 * 10  # a short run may spend the minute's RPM at once
    assert goodput.capacity(caps, 120, 0.5) == 2 * 120 + 2 * 240
    with pytest.raises(ValueError):
        goodput.parse_caps("60/4,60/4")


@pytest.mark.e2e
@pytest.mark.slow  # about 20 s: three proxies and the CLI's start-ups
def test_a_short_reactive_run_prints_its_table(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--seconds", "3", "--features-off-only", "--caps", "6/1,6/1,6/1,6/1",
           "--duration", "0.2", "--turns", "3", "--timeout", "10", "--json", str(figures)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    assert "goodput" in lines[header] and "429 up/100" in lines[header] and "load max/min" in lines[header]
    assert lines[header + 1].startswith("off ")
    assert "total wall time" in run.stdout

    data = json.loads(figures.read_text())
    load, affinity = data["results"]["off"]["load"], data["results"]["off"]["affinity"]
    assert load["capacity"] == 24 and load["offered"] > 24  # 4 x min(6 RPM, 1 x 3 s / 0.2 s); twice that offered
    assert 0 < load["goodput"] <= load["capacity"] and load["upstream_429"] > 0  # the caps bit
    assert load["logged_requests"] == load["offered"]  # the proxy logged a line per request, and they were read
    assert load["client_ok"] + load["client_429_local"] + load["client_429_upstream"] + load["timeouts"] + load[
        "errors"] == load["offered"]
    assert (affinity["conversations"], affinity["requests"], affinity["ok"]) == (8, 24, 24)
    assert sum(affinity["per_account"].values()) == 24

    quota = data["quota"]["reactive"]  # every feature off: the pool stays on the key it starts on
    assert quota["started_on"] == "kc-fresh" and quota["client_ok"] == quota["requests"] == 120
    assert quota["served_per_account"] == {"kc-fresh": 120, "kc-mid": 0, "kc-expiring": 0}
    assert (quota["expiring_used"], quota["lost_at_reset"], quota["kept"]) == (0, 100, 380)
    assert any(line.startswith("reactive ") for line in lines)

    # The "on" half's report (targets) works on figures of the same shape.
    report = goodput.report({"on": data["results"]["off"], "off": data["results"]["off"]})
    assert any(line.startswith("targets (on): goodput >= 95% of capacity") for line in report)


@pytest.mark.e2e
@pytest.mark.slow  # about 15 s: three proxies, each after a `kimi-rotate check`
def test_the_quota_phase_spends_the_expiring_quota_only_when_quota_aware(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--quota-only", "--timeout", "10", "--json", str(figures)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "quota target (aware): every request served and no expiring quota lost ok" in run.stdout
    assert not any(line.startswith("mode ") for line in run.stdout.splitlines())  # no load or affinity phase

    quota = json.loads(figures.read_text())["quota"]
    aware, blind, reactive = quota["aware"], quota["blind"], quota["reactive"]
    assert {r["started_on"] for r in quota.values()} == {"kc-fresh"}  # not the expiring account: no list-order luck
    assert all(r["client_ok"] == r["requests"] == 120 for r in quota.values())
    # Aware: kc-expiring's 100 first (its running out cost an upstream 403 or a few, retried elsewhere, and one
    # probe), the other 20 on the other two.
    assert (aware["expiring_used"], aware["lost_at_reset"], aware["kept"]) == (100, 0, 480)
    assert aware["first_served"] == "kc-expiring" and 1 <= aware["upstream_403_plan"] <= 4
    assert aware["proxy_probes"] == 1
    # Blind: new conversations spread over the three accounts; quota that expires soon is lost.
    assert 0 < blind["expiring_used"] < 100 and blind["kept"] == 500 - (120 - blind["expiring_used"])
    assert blind["upstream_403_plan"] == 0
    assert reactive["served_per_account"]["kc-fresh"] == 120
