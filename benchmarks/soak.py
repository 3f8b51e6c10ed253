"""Soak test (issue 5 item 1, full size): 64 concurrent streaming clients for 60 s through a real
`mitmdump -s kimi_rotate.py`, against the fake Kimi upstream with 6 keys in 3 accounts and about 20% of attempts
answered 429. Everything runs on 127.0.0.1 and is bounded in time.

    python benchmarks/soak.py --seconds 60 [--clients 64] [--fraction 0.2] [--json figures.json]

Prints the figures (requests, streams, 429s seen by clients, failovers, RSS before and after) and exits non-zero if a
requirement fails: an error or incomplete stream, a 429 a client saw while an eligible key existed, or RSS growth of
10 MB or more after warm-up. The CI-sized version is tests/test_reliability_load.py (same code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from certs import make_test_pki  # noqa: E402
from harness import ensure_mitm_ca, wait_keys  # noqa: E402
from test_reliability_load import judge_429s, start_load_rig, summary  # noqa: E402
from test_reliability_support import run_load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of upstream attempts answered 429")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 3600 or not 1 <= args.clients <= 512:
        parser.error("--seconds must be 1-3600 and --clients 1-512")

    work = Path(tempfile.mkdtemp(prefix="kimi-soak-"))
    try:
        pki = make_test_pki(work / "pki")
        confdir = work / "mitm"
        ensure_mitm_ca(confdir)
        fake, proxy = start_load_rig(work, pki, confdir, args.fraction)
        try:
            started = time.monotonic()
            result = run_load(proxy, clients=args.clients, seconds=args.seconds)
            figures = summary(result, fake)
            wrong = judge_429s(result, fake)
            ok = sum(1 for s in fake.requests if s.status == 200)
            limited = sum(1 for s in fake.requests if s.status == 429)
            try:
                wait_keys(proxy.home, lambda ks: sum(k.total_requests for k in ks) == ok + limited, timeout=10)
                recorded = True
            except AssertionError:
                recorded = False
            figures.update({
                "wall_seconds": round(time.monotonic() - started, 1),
                "429s_while_a_key_was_eligible": len(wrong),
                "every_attempt_recorded_in_store": recorded,
                "rss_peak_mb": round(max(kb for _, kb in result.rss_kb) / 1024, 1),
            })
        finally:
            proxy.stop()
            fake.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v}")
    for line in (result.errors[:10] + wrong[:10]):
        print("  !", line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    failed = bool(result.errors or wrong or not recorded or figures["rss_growth_after_warmup_mb"] >= 10)
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
