#!/usr/bin/env bash
# End-to-end demo: a local S3 server, a mount, an unmodified training script
# that checkpoints into the mount and resumes, then what landed in S3.
set -euo pipefail

# shellcheck source=scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

step() {
    printf '\n=== %s ===\n' "$*"
}

is_mounted() {
    awk -v target="$1" '$2 == target { found = 1 } END { exit !found }' /proc/mounts
}

WORK=""
SERVER_DIR=""
MNT=""
CACHE=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -n "$WORK" ] || exit "$status"
    if is_mounted "$MNT"; then
        echo "cleanup: unmounting $MNT" >&2
        fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true
    fi
    if [ -f "$CACHE/s3ckptfs.pid" ]; then
        local pid
        pid="$(cat "$CACHE/s3ckptfs.pid")"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cleanup: stopping daemon $pid" >&2
            kill -TERM "$pid" 2>/dev/null || true
            sleep 3
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    if [ -f "$SERVER_DIR/weed.pid" ]; then
        echo "cleanup: stopping the S3 server" >&2
        python -m s3ckptfs.devserver stop --dir "$SERVER_DIR" || true
    fi
    if [ "$status" -ne 0 ]; then
        echo "demo failed (exit $status); files kept in $WORK" >&2
        if [ -f "$CACHE/s3ckptfs.log" ]; then
            echo "--- last lines of $CACHE/s3ckptfs.log ---" >&2
            tail -n 30 "$CACHE/s3ckptfs.log" >&2
        fi
    elif ! is_mounted "$MNT"; then
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "1. Set-up: fuse3, virtualenv, s3ckptfs"
ensure_env
cd "$REPO_ROOT"
WORK="$(mktemp -d -t s3ckptfs-demo.XXXXXX)"
SERVER_DIR="$WORK/server"
MNT="$WORK/mnt"
CACHE="$WORK/cache"
mkdir -p "$MNT"

step "2. Start a local S3 server (SeaweedFS) with a bucket 'demo'"
server_env="$(python -m s3ckptfs.devserver start --dir "$SERVER_DIR" --bucket demo)"
while IFS= read -r line; do
    case "$line" in
        AWS_*=*) export "${line?}" ;;
        *) echo "unexpected line from devserver: $line" >&2; exit 1 ;;
    esac
done <<<"$server_env"
echo "S3 endpoint: $AWS_ENDPOINT_URL"

step "3. Mount s3://demo/runs/tiny at $MNT"
s3ckptfs mount s3://demo/runs/tiny "$MNT" --cache-dir "$CACHE" --endpoint-url "$AWS_ENDPOINT_URL"
is_mounted "$MNT" || { echo "mount returned but $MNT is not mounted" >&2; exit 1; }
echo "mounted; daemon pid $(cat "$CACHE/s3ckptfs.pid" 2>/dev/null || echo '?')"

step "4. Train 30 steps, checkpointing into the mount"
python examples/train.py --ckpt-dir "$MNT" --steps 30 --keep-last 3

step "5. Train again to step 60: resumes from the latest checkpoint"
python examples/train.py --ckpt-dir "$MNT" --steps 60 --keep-last 3
ls -l "$MNT"

step "6. s3ckptfs sync: wait until everything is in S3"
s3ckptfs sync "$MNT"

step "7. Objects now in s3://demo/runs/tiny/"
python -c '
import boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="demo", Prefix="runs/tiny/")
for obj in (o for page in pages for o in page.get("Contents", [])):
    print("%12d  %s" % (obj["Size"], obj["Key"]))
'

step "8. Unmount and stop the server"
s3ckptfs unmount "$MNT"
python -m s3ckptfs.devserver stop --dir "$SERVER_DIR"
echo "done"
