#!/bin/sh
# Container entrypoint: serve the mount described by the TOML config in the foreground.
#
#   (no arguments)          s3ckptfs mount --config "$S3CKPTFS_CONFIG" --foreground
#   -o key=value ... / --*  the same, with these arguments added (the command line wins)
#   ready                   exit 0 only while the mount is live: in the mount table, answering
#                           a stat, and its daemon answering (a readiness probe)
#   anything else           run that command (e.g. `s3ckptfs status /mnt/s3ckptfs/ckpt`)
#
# The daemon runs as PID 1 (exec): SIGTERM from `podman stop` or the kubelet reaches it
# directly; it unmounts, uploads what is pending (up to drain_timeout), then exits 0.
# Whatever is left stays journaled in the cache dir and resumes in the next container.
set -eu
config="${S3CKPTFS_CONFIG:-/etc/s3ckptfs/config.toml}"

config_mountpoint() {
    sed -n -E "s/^[[:space:]]*mountpoint[[:space:]]*=[[:space:]]*[\"']([^\"']+)[\"'].*$/\1/p" "$config" | head -n 1
}

ready() {
    mountpoint="$(config_mountpoint)"
    [ -n "$mountpoint" ] || { echo "no mountpoint in $config" >&2; return 1; }
    awk -v want="$mountpoint" '{ split($0, halves, " - "); split(halves[2], rest, " ");
                                 if ($5 == want && rest[1] == "fuse.s3ckptfs") found = 1 }
                               END { exit !found }' /proc/self/mountinfo \
        || { echo "$mountpoint is not mounted" >&2; return 1; }
    timeout 5 stat "$mountpoint" >/dev/null 2>&1 || { echo "$mountpoint does not answer" >&2; return 1; }
    # 0: all in S3 or uploading; 1: some upload failed (still live). Anything else: no answer.
    status=0
    timeout 5 s3ckptfs status "$mountpoint" >/dev/null 2>&1 || status=$?
    [ "$status" -le 1 ] || { echo "the daemon of $mountpoint does not answer" >&2; return 1; }
}

case "${1:-}" in
    ""|-*) ;;
    ready) ready; exit $? ;;
    *) exec "$@" ;;
esac
if [ ! -r "$config" ]; then
    echo "s3ckptfs-entrypoint: error: no config file at $config (mount one, or set S3CKPTFS_CONFIG)" >&2
    exit 2
fi
# The mountpoint's directory is normally there (a subdirectory of the propagated host path).
# A dead mount left by a killed container makes mkdir fail here; the daemon cleans it up.
mountpoint="$(config_mountpoint)"
if [ -n "$mountpoint" ]; then
    mkdir -p "$mountpoint" 2>/dev/null || true
fi
exec s3ckptfs mount --config "$config" --foreground "$@"
