#!/usr/bin/env bash
# Check the quickstart on a fresh Debian: debootstrap a minimal SUITE (bookworm = 12, trixie = 13)
# into DIR, copy this checkout in (committed files only), and run `make TARGET` there as root in a
# chroot, the way a new machine would. Needs root, debootstrap and the Debian mirror.
#   deploy/fresh-debian.sh trixie /var/tmp/ferry-trixie          # make test
#   deploy/fresh-debian.sh bookworm /var/tmp/ferry-bookworm demo
# The chroot shares this kernel, /dev, /proc and /sys (so QEMU, network namespaces and Podman
# work); its daemons are not started by package installs (policy-rc.d), as in a container.
# Its mounts live in a private mount namespace; DIR is kept for a rerun (`rm -rf DIR` to redo).
set -euo pipefail
suite=${1:?usage: fresh-debian.sh SUITE DIR [make target]}
root=${2:?usage: fresh-debian.sh SUITE DIR [make target]}
target=${3:-test}
mirror=${MIRROR:-http://deb.debian.org/debian}
repo=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$root/usr/bin/apt-get" ]; then
  # `make` is the one thing the quickstart assumes; everything else is the project's to install.
  debootstrap --variant=minbase --include=make,ca-certificates "$suite" "$root" "$mirror"
fi
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
# The host's way out stays the chroot's: resolver, local trust anchors (e.g. a TLS-inspecting
# egress proxy), pip settings and proxy/certificate environment variables.
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
passthrough=()
while IFS= read -r var; do passthrough+=("$var=${!var}"); done < <(
  compgen -e | grep -E '^(PIP_CERT|PIP_INDEX_URL|PIP_EXTRA_INDEX_URL|PIP_TRUSTED_HOST|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)$' || true)

rm -rf "$root/ferry"
git -C "$repo" archive --format=tar --prefix=ferry/ HEAD | tar -x -C "$root"
echo "fresh-debian: $(cat "$root/etc/debian_version") in $root: make $target"

# A private mount namespace, so every mount below ends with it; pivot_root rather than chroot,
# so the mount table the tests see is a clean tree (CRIU refuses a chroot's: "No parent found").
export root target
# Descriptors this script inherited point into the host's mounts, which CRIU cannot resolve
# from inside: close all but stdio first.
unshare --mount --propagation private bash -euo pipefail -s -- "${passthrough[@]}" <<'INNER'
for fd in $(ls /proc/$$/fd); do if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi; done
mount --bind "$root" "$root"
for fs in dev proc sys; do mkdir -p "$root/$fs"; mount --rbind "/$fs" "$root/$fs"; done
mkdir -p "$root/run" "$root/.host"
mount -t tmpfs tmpfs "$root/run"
cd "$root"
pivot_root . .host
exec /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  TERM="${TERM:-dumb}" CI=true "$@" bash -c "umount -l /.host && cd /ferry && make $target"
INNER
