#!/usr/bin/env bash
# Build the sidecar image offline: a local Debian base (mmdebstrap), a wheelhouse made on this
# host, then the top-level Dockerfile with buildah. Nothing is pulled from a container registry
# and pip inside the build never touches the network, which is also what an air-gapped cluster
# needs.
#
#   scripts/build-image.sh [--tag IMAGE] [--base IMAGE]
#
#   --tag IMAGE    the image to build (default localhost/prefill-bootstrap:dev)
#   --base IMAGE   build on an image already in local storage (e.g. a python slim image you
#                  loaded) instead of the local Debian base
#
# Cached under .cache/ (gitignored): the Debian rootfs tarball, keyed by its recipe, and the
# wheelhouse. A second run reuses the base image and buildah's layer cache. Needs root (or a
# working rootless buildah), buildah, mmdebstrap and pip.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tag=localhost/prefill-bootstrap:dev
base=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cache="$repo/.cache"
# The build context is a directory holding only the wheelhouse: nothing else of the tree can
# leak into the image, and edits elsewhere do not invalidate buildah's layer cache.
context="$cache/image-context"
wheelhouse="$context/wheelhouse"
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "build-image: $1 is missing; run 'make system-deps' (Debian package $2)" >&2
    exit 1
}
need buildah buildah

say() { printf 'build-image: %s\n' "$*" >&2; }
started=$(date +%s)

# 1. The base: Debian bookworm with python3 and venv, nothing else (no apt, no perl, no docs).
#    --variant=essential keeps apt out of the image; the merged-usr hook avoids the usrmerge
#    package and the perl it drags in. `passwd` provides useradd for the Dockerfile.
debian_suite=bookworm
# shellcheck disable=SC2054 # the commas belong to --include
mmdebstrap_args=(
    --variant=essential
    --include=python3,python3-venv,passwd
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt=path-exclude=/usr/share/man/*
    --dpkgopt=path-exclude=/usr/share/info/*
    --dpkgopt=path-exclude=/usr/share/locale/*
    --dpkgopt=path-include=/usr/share/locale/locale.alias
    --dpkgopt=path-exclude=/usr/share/doc/*
    --dpkgopt=path-include=/usr/share/doc/*/copyright
)
if [ -z "$base" ]; then
    recipe_hash=$(printf '%s\n' "$debian_suite" "${mmdebstrap_args[@]}" | sha256sum | cut -c1-12)
    base="localhost/prefill-bootstrap-base:$debian_suite-$recipe_hash"
    if buildah inspect --type image "$base" >/dev/null 2>&1; then
        say "base image $base is cached"
    else
        need mmdebstrap mmdebstrap
        rootfs="$cache/rootfs/$debian_suite-$recipe_hash.tar"
        if [ ! -s "$rootfs" ]; then
            say "making the Debian $debian_suite rootfs with mmdebstrap (about 30 s)"
            mkdir -p "$(dirname "$rootfs")"
            # No mirror argument: mmdebstrap uses Debian's default sources, as apt does here.
            if ! mmdebstrap "${mmdebstrap_args[@]}" "$debian_suite" "$rootfs.partial" \
                >"$rootfs.log" 2>&1; then
                tail -n 40 "$rootfs.log" >&2
                say "mmdebstrap failed; the whole log is $rootfs.log"
                exit 1
            fi
            mv "$rootfs.partial" "$rootfs"
        fi
        say "importing $rootfs as $base"
        container=$(buildah from scratch)
        buildah add --quiet "$container" "$rootfs" / >/dev/null
        buildah config --cmd python3 --label "org.opencontainers.image.base.name=debian:$debian_suite" "$container"
        buildah commit --quiet --rm "$container" "$base" >/dev/null
    fi
fi

# 2. The wheelhouse: this project's wheel plus every dependency of [server], for exactly the
#    interpreter and glibc inside the base (asked of the base itself, not guessed from the host).
target=$(
    container=$(buildah from --quiet --pull=never "$base")
    trap 'buildah rm "$container" >/dev/null' EXIT
    buildah run --isolation chroot "$container" -- python3 -c \
        'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1], platform.machine())'
)
read -r py_version glibc machine <<<"$target"
say "base $base: Python $py_version, glibc $glibc, $machine"
platforms=()
for minor in $(seq "${glibc#2.}" -1 5); do platforms+=(--platform "manylinux_2_${minor}_$machine"); done
platforms+=(--platform "manylinux2014_$machine" --platform "manylinux2010_$machine" --platform "manylinux1_$machine")

mkdir -p "$wheelhouse"
rm -f "$wheelhouse"/prefill_bootstrap-*.whl
say "building the wheelhouse in ${wheelhouse#"$repo/"}"
# A fixed timestamp makes the wheel a function of the sources alone, so an unchanged tree gives
# an unchanged build context and buildah's layer cache holds.
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check \
    --no-deps --wheel-dir "$wheelhouse" "$repo"
own_wheel=$(ls "$wheelhouse"/prefill_bootstrap-*.whl)
download=("$python" -m pip download --quiet --disable-pip-version-check --dest "$wheelhouse"
    --only-binary=:all: --implementation cp --python-version "$py_version"
    --abi "cp${py_version/./}" "${platforms[@]}" "${own_wheel}[server]")
# The wheelhouse from an earlier run may already hold everything: then no index is asked.
if ! "${download[@]}" --no-index --find-links "$wheelhouse" >/dev/null 2>&1; then
    "${download[@]}"
fi

# 3. The image. --format docker keeps HEALTHCHECK (the OCI format has no such field).
say "building $tag"
buildah bud --isolation chroot --format docker --layers --pull=never --quiet \
    --build-arg "BASE_IMAGE=$base" --build-arg "WHEELHOUSE=wheelhouse" \
    --tag "$tag" --file "$repo/Dockerfile" "$context" >/dev/null

size=$(buildah images --noheading --format '{{.Size}}' "$tag" | head -n1)
say "built $tag ($size) in $(($(date +%s) - started)) s"
printf '%s\n' "$tag"
