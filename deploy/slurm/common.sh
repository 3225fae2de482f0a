# shellcheck shell=bash
# Shared by prolog.sh and epilog.sh: settings, logging, and which s3ckptfs mounts this node has.
#
# Settings come from the environment, else from /etc/s3ckptfs/slurm.env (a file of VAR=value
# lines; S3CKPTFS_SLURM_ENV names another one), since slurmd runs prologs and epilogs with
# almost no environment:
#   S3CKPTFS_MOUNTPOINT   the mountpoint(s) to check, separated by spaces; default: the
#                         "mountpoint" of every config file (S3CKPTFS_CONFIG, or /etc/s3ckptfs/*.toml)
#   S3CKPTFS_CONFIG       config file(s) to read mountpoints from, separated by spaces
#   S3CKPTFS_BIN          the s3ckptfs command (default: found in PATH)

PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export PATH

_env_file="${S3CKPTFS_SLURM_ENV:-/etc/s3ckptfs/slurm.env}"
if [ -r "$_env_file" ]; then
    # Only variables not already set: the environment wins over the file.
    while IFS='=' read -r _name _value; do
        case "$_name" in
            ''|'#'*) continue ;;
        esac
        _name="${_name// /}"
        _value="${_value%\"}"; _value="${_value#\"}"
        if [ -z "${!_name+x}" ]; then
            export "$_name=$_value"
        fi
    done <"$_env_file"
fi

S3CKPTFS_BIN="${S3CKPTFS_BIN:-$(command -v s3ckptfs || echo /usr/local/bin/s3ckptfs)}"
TAG="s3ckptfs-${SCRIPT_NAME:-slurm}"

# One line to stderr (slurmd's log) and to syslog when there is one.
say() {
    printf '%s: %s\n' "$TAG" "$*" >&2
    if command -v logger >/dev/null 2>&1; then
        logger -t "$TAG" -- "${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*" 2>/dev/null || true
    fi
}

# The "mountpoint" value of a config file (a one-line TOML string), or nothing.
config_mountpoint() {
    sed -n -E "s/^[[:space:]]*mountpoint[[:space:]]*=[[:space:]]*[\"']([^\"']+)[\"'].*$/\1/p" "$1" | head -n 1
}

# The mountpoints to look after, one per line.
mountpoints() {
    local file
    if [ -n "${S3CKPTFS_MOUNTPOINT:-}" ]; then
        # Split on spaces, never glob.
        local -a listed
        read -r -a listed <<<"$S3CKPTFS_MOUNTPOINT"
        printf '%s\n' "${listed[@]}"
        return
    fi
    for file in ${S3CKPTFS_CONFIG:-/etc/s3ckptfs/*.toml}; do
        [ -r "$file" ] && config_mountpoint "$file"
    done
}

# Whether PATH is an s3ckptfs FUSE mount in the mount table (never touches the mount itself).
is_s3ckptfs_mount() {
    awk -v want="$1" '{ split($0, halves, " - "); split(halves[2], rest, " ");
                        if ($5 == want && rest[1] == "fuse.s3ckptfs") found = 1 }
                      END { exit !found }' /proc/self/mountinfo
}
