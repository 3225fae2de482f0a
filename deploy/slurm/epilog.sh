#!/usr/bin/env bash
# Slurm Epilog: wait, up to a limit, for the job's checkpoints to be in S3. Always exits 0.
#
# The job has ended, so everything it wrote is closed: the epilog waits until it is complete
# in S3, at most S3CKPTFS_EPILOG_TIMEOUT seconds (default 300; keep it below slurm.conf's
# PrologEpilogTimeout). What is still uploading or has failed is logged, file by file, to
# stderr and syslog. The epilog never fails: a slow upload is no reason to drain the node, and
# the daemon goes on uploading after the epilog (the data is journaled in its cache dir).
#
# S3CKPTFS_EPILOG_PATH limits the wait to a directory inside each mount; %j is replaced by
# the job id and %u by the user name (e.g. "runs/%u/%j"). Default: the whole mount.
set -uo pipefail
SCRIPT_NAME=epilog
# shellcheck source=deploy/slurm/common.sh
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/common.sh"

limit="${S3CKPTFS_EPILOG_TIMEOUT:-300}"
started="$(date +%s)"

sub="${S3CKPTFS_EPILOG_PATH:-}"
sub="${sub//%j/${SLURM_JOB_ID:-}}"
sub="${sub//%u/${SLURM_JOB_USER:-}}"

while IFS= read -r mountpoint; do
    [ -n "$mountpoint" ] || continue
    if ! is_s3ckptfs_mount "$mountpoint"; then
        say "$mountpoint is not mounted; nothing to wait for"
        continue
    fi
    target="$mountpoint${sub:+/${sub#/}}"
    left=$(( limit - ($(date +%s) - started) ))
    [ "$left" -gt 0 ] || left=1
    # The daemon answers within the limit or sync gives up by itself; timeout(1) is a last guard.
    output="$(timeout $(( left + 30 )) "$S3CKPTFS_BIN" sync --timeout "$left" "$mountpoint" \
        ${sub:+"$target"} 2>&1)"
    code=$?
    took=$(( $(date +%s) - started ))
    if [ "$code" -eq 0 ]; then
        say "checkpoints under $target are in S3 (waited ${took}s)"
        continue
    fi
    say "checkpoints under $target are NOT all in S3 after ${took}s; the daemon keeps uploading:"
    while IFS= read -r line; do
        [ -n "$line" ] && say "  ${line#s3ckptfs: error: }"
    done <<<"$output"
done < <(mountpoints)
exit 0
