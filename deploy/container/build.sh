#!/usr/bin/env bash
# Build the s3ckptfs container image on this machine, without a registry:
#
#   1. mmdebstrap makes a Debian trixie root filesystem (python3, python3-venv, fuse3,
#      ca-certificates) from Debian's packages, and `podman import` makes it the base image
#      localhost/s3ckptfs-base:trixie-HASH;
#   2. pip gathers the wheels of s3ckptfs (from this checkout) and of its dependencies, for
#      trixie's Python 3.13;
#   3. `podman build` runs deploy/container/Containerfile on that base:
#      localhost/s3ckptfs:HASH, also tagged localhost/s3ckptfs:latest.
#
# HASH is a hash of the content that goes in (package list; Containerfile, entrypoint and the
# package's sources), so each step is skipped when its image already exists: building twice
# costs nothing. The image name is the last line on stdout; progress goes to stderr.
#
#   deploy/container/build.sh                    build (or find) the image
#   deploy/container/build.sh --context-only DIR only prepare a build context in DIR
#                                                (for `podman build`/`docker build` elsewhere)
#
# Needs: podman, mmdebstrap (apt-get install podman mmdebstrap runc), root, and a Python with
# pip (PYTHON, default the checkout's .venv). PODMAN_RUNTIME picks the OCI runtime (default
# runc: crun fails on setrlimit on some machines). S3CKPTFS_DEBIAN_MIRROR overrides the mirror
# (default: the one the host's apt uses, else deb.debian.org).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
SUITE=trixie
PACKAGES="python3,python3-venv,fuse3,ca-certificates"
RUNTIME="${PODMAN_RUNTIME:-runc}"
PYTHON="${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}"

log() { printf '[build] %s\n' "$*" >&2; }

hash_of() { sha256sum | cut -c1-12; }

source_hash() {
    (
        cd "$REPO"
        for file in deploy/container/Containerfile deploy/container/entrypoint.sh pyproject.toml README.md \
                    $(find s3ckptfs -name '*.py' | LC_ALL=C sort); do
            printf '%s\n' "$file"
            cat "$file"
        done
    ) | hash_of
}

mirror() {
    if [ -n "${S3CKPTFS_DEBIAN_MIRROR:-}" ]; then
        echo "$S3CKPTFS_DEBIAN_MIRROR"
        return
    fi
    local site
    # shellcheck disable=SC2016  # $(SITE) is apt's template, not the shell's
    site="$(apt-get indextargets --format '$(SITE)' 2>/dev/null | grep -v -- '-security' | sort -u | head -n 1 || true)"
    echo "${site:-http://deb.debian.org/debian}"
}

# Wheels of s3ckptfs and its dependencies for CPython 3.13 on x86_64 glibc, into $1.
gather_wheels() {
    local dest="$1"
    mkdir -p "$dest"
    # Built from a copy: a build leaves a build/ directory behind in its source tree.
    local src
    src="$(mktemp -d)"
    cp -r "$REPO/s3ckptfs" "$REPO/pyproject.toml" "$REPO/README.md" "$src/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src" >&2
    rm -rf "$src"
    local wheel
    wheel="$(ls "$dest"/s3ckptfs-*.whl)"
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.13 --implementation cp \
        --abi cp313 --abi abi3 --abi none \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$dest" "$wheel" >&2
}

prepare_context() {
    local dir="$1"
    mkdir -p "$dir"
    cp "$HERE/Containerfile" "$HERE/entrypoint.sh" "$dir/"
    gather_wheels "$dir/wheels"
}

if [ "${1:-}" = "--context-only" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 --context-only DIR" >&2; exit 2; }
    prepare_context "$2"
    log "build context ready in $2"
    exit 0
fi

for tool in podman mmdebstrap; do
    command -v "$tool" >/dev/null || { echo "build.sh: error: $tool is missing (apt-get install podman mmdebstrap runc)" >&2; exit 1; }
done

started=$SECONDS
base_tag="localhost/s3ckptfs-base:$SUITE-$(printf '%s %s minbase\n' "$SUITE" "$PACKAGES" | hash_of)"
image_tag="localhost/s3ckptfs:$(printf '%s\n%s\n' "$base_tag" "$(source_hash)" | hash_of)"

if podman image exists "$image_tag"; then
    log "$image_tag exists (same content): nothing to build"
    echo "$image_tag"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if podman image exists "$base_tag"; then
    log "base image $base_tag exists"
else
    log "mmdebstrap $SUITE ($PACKAGES) from $(mirror)"
    # shellcheck disable=SC2016  # "$1" is for mmdebstrap's hook, not this shell
    mmdebstrap --variant=minbase --include="$PACKAGES" \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$SUITE" "$work/rootfs.tar" "$(mirror)" >&2
    podman import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$base_tag" >/dev/null
    rm -f "$work/rootfs.tar"
    log "base image $base_tag imported after $((SECONDS - started))s"
fi

prepare_context "$work/context"
log "podman build ($RUNTIME) on $base_tag"
podman --runtime "$RUNTIME" build --pull=never --build-arg "BASE=$base_tag" -t "$image_tag" \
    -f "$work/context/Containerfile" "$work/context" >&2
podman tag "$image_tag" localhost/s3ckptfs:latest
# Images of older sources are of no use any more: keep the disk bounded.
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/s3ckptfs); do
    case "$old" in
        "$image_tag"|localhost/s3ckptfs:latest) ;;
        *) podman rmi "$old" >/dev/null 2>&1 || true ;;
    esac
done
log "built $image_tag in $((SECONDS - started))s"
echo "$image_tag"
