# shellcheck shell=bash
# Common set-up for scripts/test.sh and scripts/demo.sh; source it, then call ensure_env.
#
# Works on a fresh Debian machine: installs fuse3 if fusermount3 is missing,
# creates .venv in the repository, installs the package with its test extras
# (torch pinned to 2.13.0, installed first so that no other build is pulled
# in) and puts .venv/bin first on PATH. Re-running is cheap: the install is
# skipped while pyproject.toml is unchanged and the packages still import.
#
# Optionally (ensure_libfuse) it builds libfuse 3.17.2 into the venv, which
# lets the daemon use FUSE passthrough for files being written (kernel >= 6.9).
# Any failure there is one warning line: mounts then use the system libfuse3.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
TORCH_PIN="torch==2.13.0"
LIBFUSE_VERSION="3.17.2"
LIBFUSE_DEB_VERSION="3.17.2-3"   # Debian trixie's source package

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
        && "$python" -c 'import s3ckptfs, torch, pytest, xdist, mfusepy, boto3' >/dev/null 2>&1; then
        return 0
    fi
    log "installing $TORCH_PIN and s3ckptfs[test] into $VENV"
    local pip_log="$VENV/pip-install.log"
    # --no-compile: byte-compiling every module of torch, transformers and the rest takes longer
    # than the install itself; Python compiles the few modules in use when they are first imported.
    if ! { "$python" -m pip install -q --no-compile "$TORCH_PIN" \
        && "$python" -m pip install -q --no-compile -e "${REPO_ROOT}[test]"; } >"$pip_log" 2>&1; then
        cat "$pip_log" >&2
        log "error: pip install failed (log: $pip_log)"
        return 1
    fi
    printf '%s\n' "$want" >"$stamp"
}

build_libfuse() {
    # Build libfuse $LIBFUSE_VERSION from Debian's source package into $1. Prints a log, returns non-zero
    # on any failure. The host's apt configuration is not touched: a private sources list,
    # lists and cache in a temporary dir; the download is checked against Debian's signed index.
    local work status=0
    work="$(mktemp -d)"
    build_libfuse_in "$1" "$work" || status=$?
    rm -rf "$work"
    return "$status"
}

build_libfuse_in() {
    local dest="$1" work="$2"
    local apt_dir="$work/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    # The same Debian mirror the host's apt uses, for the next release's source package.
    local mirror
    mirror="$(apt-get indextargets --format '$(SITE)' 2>/dev/null | grep -v -- '-security' | sort -u | head -n 1)"
    [ -n "$mirror" ] || { echo "no Debian mirror in the apt configuration"; return 1; }
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' "$mirror" \
        >"$apt_dir/sources.list"
    local apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
                    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    command -v cc >/dev/null && command -v pkg-config >/dev/null && command -v dpkg-source >/dev/null \
        || { echo "needs cc, pkg-config and dpkg-source (dpkg-dev)"; return 1; }
    apt-get "${apt_opts[@]}" update || return 1
    (cd "$work" && apt-get "${apt_opts[@]}" source --download-only "fuse3=$LIBFUSE_DEB_VERSION") || return 1
    (cd "$work" && dpkg-source -x "fuse3_${LIBFUSE_DEB_VERSION}.dsc" src) || return 1
    python3 -m venv "$work/tools" && "$work/tools/bin/pip" install -q meson ninja || return 1
    (cd "$work/src" && PATH="$work/tools/bin:$PATH" \
        meson setup build --buildtype=release -Dutils=false -Dexamples=false -Dtests=false -Duseroot=false \
        && PATH="$work/tools/bin:$PATH" ninja -C build) || return 1
    local built="$work/src/build/lib/libfuse3.so.$LIBFUSE_VERSION"
    [ -f "$built" ] || { echo "no $built after the build"; return 1; }
    mkdir -p "$dest" && cp "$built" "$dest/" && ln -sf "libfuse3.so.$LIBFUSE_VERSION" "$dest/libfuse3.so.4.tmp" \
        && mv -T "$dest/libfuse3.so.4.tmp" "$dest/libfuse3.so.4" || return 1
    python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$dest/libfuse3.so.4" \
        || { rm -f "$dest/libfuse3.so.4"; return 1; }
}

ensure_libfuse() {
    # Optional: libfuse $LIBFUSE_VERSION in $VENV/lib/s3ckptfs-libfuse, which the daemon prefers over
    # the system libfuse3 (see s3ckptfs/fuse_ops.py). Skipped once present, or once failed
    # (delete the .failed file to try again). Never fails the set-up.
    local dest="$VENV/lib/s3ckptfs-libfuse"
    local failed="$dest/.failed-$LIBFUSE_VERSION"
    [ -e "$dest/libfuse3.so.4" ] && return 0
    if [ -e "$failed" ]; then
        log "warning: libfuse $LIBFUSE_VERSION unavailable (an earlier build failed, see $failed); no FUSE passthrough"
        return 0
    fi
    log "building libfuse $LIBFUSE_VERSION for FUSE passthrough (optional, about a minute)"
    mkdir -p "$dest"
    if ! build_libfuse "$dest" >"$dest/build.log" 2>&1; then
        mv "$dest/build.log" "$failed"
        log "warning: could not build libfuse $LIBFUSE_VERSION (log: $failed); mounts use the system libfuse3 without FUSE passthrough"
    fi
    return 0
}

ensure_podman() {
    # Only the container lifecycle test needs them; without them it is skipped with the reason.
    # crun fails on setrlimit on some VMs: the tests run podman with runc.
    if ! command -v podman >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1 \
        || ! command -v runc >/dev/null 2>&1; then
        log "installing podman, mmdebstrap and runc (for the container test)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman mmdebstrap runc >/dev/null 2>&1 \
            || log "warning: podman unavailable; the container test will be skipped"
    fi
}

ensure_env() {
    ensure_fuse
    ensure_systemd_analyze
    # The libfuse build needs nothing from the venv's packages: it runs beside the pip install.
    ensure_libfuse &
    local libfuse_job=$! status=0
    ensure_venv || status=$?
    wait "$libfuse_job"
    [ "$status" -eq 0 ] || return "$status"
    export PATH="$VENV/bin:$PATH"
}
