# shellcheck shell=bash
# Common set-up for scripts/test.sh and scripts/demo.sh; source it, then call ensure_env.
#
# Works on a fresh Debian machine: installs fuse3 if fusermount3 is missing,
# creates .venv in the repository, installs the package with its test extras
# (torch pinned to 2.13.0, installed first so that no other build is pulled
# in) and puts .venv/bin first on PATH. Re-running is cheap: the install is
# skipped while pyproject.toml is unchanged and the packages still import.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
TORCH_PIN="torch==2.13.0"

log() {
    printf '[setup] %s\n' "$*" >&2
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

ensure_fuse() {
    if ! command -v fusermount3 >/dev/null 2>&1; then
        log "installing fuse3"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
    fi
    if [ ! -c /dev/fuse ]; then
        log "error: /dev/fuse is not available on this machine"
        return 1
    fi
}

ensure_systemd_analyze() {
    # Only the unit-file test needs it; without it that test is skipped.
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        log "installing systemd (for systemd-analyze verify)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null 2>&1 \
            || log "warning: systemd-analyze unavailable; the unit-file test will be skipped"
    fi
}

ensure_venv() {
    local python="$VENV/bin/python"
    local stamp="$VENV/.s3ckptfs-installed"
    local want
    if [ ! -x "$python" ]; then
        log "creating $VENV"
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { log "error: python3 >= 3.11 is required"; return 1; }
        python3 -m venv "$VENV"
    fi
    want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$python" -c 'import s3ckptfs, torch, pytest, mfusepy, boto3' >/dev/null 2>&1; then
        return 0
    fi
    log "installing $TORCH_PIN and s3ckptfs[test] into $VENV"
    local pip_log="$VENV/pip-install.log"
    if ! { "$python" -m pip install -q "$TORCH_PIN" \
        && "$python" -m pip install -q -e "${REPO_ROOT}[test]"; } >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        log "error: pip install failed (log: $pip_log)"
        return 1
    fi
    printf '%s\n' "$want" >"$stamp"
}

ensure_env() {
    ensure_fuse
    ensure_systemd_analyze
    ensure_venv
    export PATH="$VENV/bin:$PATH"
}
