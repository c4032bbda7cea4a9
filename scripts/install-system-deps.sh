#!/usr/bin/env bash
# Debian packages the tests need; installs only what is missing, so it is cheap to re-run.
set -euo pipefail

packages=(
    iproute2   # ip netns: the multi-host tests
    iptables   # packet loss and partitions on a host's link: the network-fault tests
    procps     # pkill/ps used by test clean-up
    curl       # the README tour and container checks
    chromium   # the status page test drives a real headless browser
    tmux       # the live terminal grid (table --watch) is tested in a real terminal
    buildah    # the sidecar image: built offline by scripts/build-image.sh
    podman     # ... and run by tests/test_container_image.py
    runc       # podman's OCI runtime here
    catatonit  # podman run --init
    mmdebstrap # the local Debian base image (no container registry to pull one from)
    wrk        # make bench: cross-checks the GET phases with a C load generator
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: missing ${missing[*]}; run as root or install them yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: installed ${missing[*]}"
