#!/usr/bin/env bash
# The test suite (real model, real vLLM engine and server). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
guardit model prepare >/dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# pytest exits 5 when it collected no test: that fails here like any other non-zero status.
exec python -m pytest "$@"
