#!/usr/bin/env bash
# Installs everything the tests need and runs them: `scripts/test.sh [pytest args]`.
#   .venv          the project with its test and dev extras (mitmproxy 11.0.2 on Python 3.11, 12.x on 3.12+)
#   .venv-clients  the openai and anthropic SDKs, which the end-to-end tests run as separate processes:
#                  their current releases need h11 >= 0.16, which mitmproxy 11.0.2 forbids.
# PYTHON picks the interpreter (default python3); VENV renames the project venv (CI uses it for 3.12).
# INSTALL_ONLY=1 stops after installing; SKIP_INSTALL=1 runs pytest on environments installed before (.ci/run uses both
# to install once and then run the two Python lines side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CLIENTS=${CLIENTS_VENV:-.venv-clients}

pip_quiet() {  # pip, without the notices this machine's pip configuration prints for every package
  "$@" 2> >(grep -v '^WARNING: Location' >&2)
}

if [ -z "${SKIP_INSTALL:-}" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  pip_quiet "$VENV/bin/python" -m pip install -q -e '.[test,dev]'

  [ -x "$CLIENTS/bin/python" ] || "$PYTHON" -m venv "$CLIENTS"
  pip_quiet "$CLIENTS/bin/python" -m pip install -q --upgrade pip
  pip_quiet "$CLIENTS/bin/python" -m pip install -q openai anthropic httpx

  if command -v npm >/dev/null 2>&1 && [ ! -d tests/node/node_modules/openai ]; then
    (cd tests/node && npm install --silent --no-audit --no-fund >/dev/null) || echo "note: npm install failed; the Node client test will be skipped"
  fi
fi
[ -z "${INSTALL_ONLY:-}" ] || exit 0

export KIMI_TEST_CLIENTS_PYTHON="$PWD/$CLIENTS/bin/python"
exec "$VENV/bin/python" -m pytest "$@"
