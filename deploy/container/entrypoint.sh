#!/bin/sh
# Container entrypoint: serve the mount described by the TOML config in the foreground.
#
#   (no arguments)          s3ckptfs mount --config "$S3CKPTFS_CONFIG" --foreground
#   -o key=value ... / --*  the same, with these arguments added (the command line wins)
#   anything else           run that command (e.g. `s3ckptfs status /mnt/s3ckptfs`)
#
# The daemon runs as PID 1 (exec): SIGTERM from `podman stop` or the kubelet reaches it
# directly; it unmounts, uploads what is pending (up to drain_timeout), then exits 0.
# Whatever is left stays journaled in the cache dir and resumes in the next container.
set -eu
config="${S3CKPTFS_CONFIG:-/etc/s3ckptfs/config.toml}"
case "${1:-}" in
    ""|-*) ;;
    *) exec "$@" ;;
esac
if [ ! -r "$config" ]; then
    echo "s3ckptfs-entrypoint: error: no config file at $config (mount one, or set S3CKPTFS_CONFIG)" >&2
    exit 2
fi
# The mountpoint is normally a bind mount of the host's directory; create it if it is not.
# A dead mount left there by a killed container fails this test; the daemon cleans it up.
mountpoint="$(sed -n -E "s/^[[:space:]]*mountpoint[[:space:]]*=[[:space:]]*[\"']([^\"']+)[\"'].*$/\1/p" "$config" | head -n 1)"
if [ -n "$mountpoint" ]; then
    mkdir -p "$mountpoint" 2>/dev/null || true
fi
exec s3ckptfs mount --config "$config" --foreground "$@"
