#!/usr/bin/env bash
# Set up the machine if needed, then run the test suite: scripts/test.sh [pytest args...]
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ensure_env
ensure_podman
cd "$REPO_ROOT"

# Two pytest-xdist workers by default (S3CKPTFS_TEST_WORKERS=N to change, 0 for none): many FUSE
# tests mostly wait (outages, timeouts), and the other worker's tests use that time. One process
# when the arguments choose the distribution themselves (-n ..., -p no:xdist) or need the
# terminal (-s, --pdb, which workers do not pass through).
workers="${S3CKPTFS_TEST_WORKERS:-2}"
xdist=(-n "$workers" --dist loadgroup)
for arg in "$@"; do
    case "$arg" in
        -n|-n*|--numprocesses|--numprocesses=*|--dist|--dist=*|no:xdist|-pno:xdist) xdist=() ;;
        -s|--capture=no|--pdb|--trace) xdist=() ;;
    esac
done
[ "$workers" != 0 ] || xdist=()

status=0
python -m pytest -q ${xdist[@]+"${xdist[@]}"} "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: error: pytest collected no tests (arguments: ${*:-none})" >&2
fi
exit "$status"
