#!/usr/bin/env bash
# Slurm Prolog: refuse to start a job on a node whose s3ckptfs mount is not live and healthy.
#
# For every mountpoint (see common.sh), within S3CKPTFS_PROLOG_TIMEOUT seconds (default 10):
# it is an s3ckptfs mount, it answers a stat (a daemon that died leaves a mount that answers
# ENOTCONN, a hung one does not answer), its daemon answers, and no upload of it has failed
# (S3 refusing writes; set S3CKPTFS_PROLOG_ALLOW_FAILED=1 to only warn). The first problem
# is one line on stderr and in syslog, and the exit code is 1: slurmd then drains the node
# and requeues the job, which is what should happen to a node that cannot save checkpoints.
set -uo pipefail
SCRIPT_NAME=prolog
# shellcheck source=deploy/slurm/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

limit="${S3CKPTFS_PROLOG_TIMEOUT:-10}"

fail() {
    say "$*"
    exit 1
}

found=0
while IFS= read -r mountpoint; do
    [ -n "$mountpoint" ] || continue
    found=1
    is_s3ckptfs_mount "$mountpoint" \
        || fail "$mountpoint is not mounted (is the s3ckptfs service running? systemctl status 's3ckptfs@*')"
    timeout "$limit" stat -c %i "$mountpoint" >/dev/null 2>&1 \
        || fail "$mountpoint does not answer within ${limit}s (its daemon died or hangs)"
    status="$(timeout "$limit" "$S3CKPTFS_BIN" status "$mountpoint" 2>&1)"
    code=$?
    case "$code" in
        0) ;;
        1)
            if ! grep -q "^failed " <<<"$status"; then
                fail "$mountpoint: ${status##*$'\n'}"
            fi
            failed="$(grep -c "^failed " <<<"$status")"
            if [ "${S3CKPTFS_PROLOG_ALLOW_FAILED:-0}" = 1 ]; then
                say "warning: $mountpoint has $failed failed upload(s) (see s3ckptfs status $mountpoint)"
            else
                fail "$mountpoint has $failed failed upload(s): S3 refuses this node's writes (see s3ckptfs status $mountpoint)"
            fi
            ;;
        124) fail "$mountpoint: its daemon does not answer within ${limit}s" ;;
        *) fail "$mountpoint: s3ckptfs status failed (exit $code): ${status##*$'\n'}" ;;
    esac
done < <(mountpoints)

[ "$found" = 1 ] || fail "no s3ckptfs mountpoint configured (set S3CKPTFS_MOUNTPOINT or S3CKPTFS_CONFIG in /etc/s3ckptfs/slurm.env)"
exit 0
