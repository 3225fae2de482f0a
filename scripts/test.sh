#!/usr/bin/env bash
# Set up the machine if needed, then run the test suite: scripts/test.sh [pytest args...]
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ensure_env
ensure_podman
cd "$REPO_ROOT"

status=0
python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: error: pytest collected no tests (arguments: ${*:-none})" >&2
fi
exit "$status"
