#!/usr/bin/env bash
# The main job: prepare the bundled model → calibrate the demo concept → query before/after.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
guardit model prepare >/dev/null
exec guardit demo "$@"
