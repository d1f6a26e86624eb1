#!/usr/bin/env bash
# Installs what Ferry's Podman runtime needs: podman, runc and CRIU >= 4.1.
#
# Why CRIU is special: Debian 12's criu 3.17 fails on kernels >= 6.13 ("vdso: Unexpected rt vDSO
# area bounds"); Debian 13's criu 4.1.1 binary needs glibc 2.38; and stock 4.1.1 cannot dump TCP
# sockets on kernels >= 6.16 (see patch_criu). So: on Debian 13 the packaged criu is tried first;
# wherever it is missing or fails the probe, 4.1.1 is built from Debian 13's source tarball
# (fetched through apt with a private deb-src list, so the system's own sources stay untouched),
# patched, and installed as /usr/local/sbin/criu. Builds happen in $CACHE, never in the repo.
# Idempotent: exits at once when everything is already in place.
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_DEB_VERSION=4.1.1-1
CRIU_MIN=4.1
CACHE=/var/cache/ferry/criu
RUNC_CONF=/etc/criu/runc.conf
# netavark and iptables are podman's network stack (Recommends, which we do not install by
# default); python3 runs the TCP-dump probe in criu_dumps_tcp.
RUNTIME_PACKAGES=(podman runc conmon netavark iptables python3 zstd tar)
BUILD_DEPS=(build-essential pkg-config protobuf-c-compiler libprotobuf-c-dev libprotobuf-dev
    protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev
    libnftables-dev uuid-dev xz-utils)
export DEBIAN_FRONTEND=noninteractive

say() { echo "install-criu: $*"; }
die() { echo "install-criu: ERROR: $*" >&2; exit 1; }

# The probes run a real checkpoint; on a loaded machine they have failed and passed a minute later
# with nothing changed. A failure that may be transient is retried before criu is rebuilt.
PROBE_ATTEMPTS=${FERRY_CRIU_PROBE_ATTEMPTS:-3}
PROBE_PAUSE=${FERRY_CRIU_PROBE_PAUSE:-5}

criu_usable() {
    # True when the criu on PATH is new enough, passes `criu check` and can dump a TCP socket
    # (`criu check` alone passes with an unpatched 4.1.1 on Linux >= 6.16, see patch_criu).
    # Missing, too old, or the known socket bug: decided at once. Anything else: retried.
    local version attempt rc
    command -v criu >/dev/null || { say "no criu on PATH"; return 1; }
    version=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p')
    if ! { [[ -n $version ]] && dpkg --compare-versions "$version" ge "$CRIU_MIN"; }; then
        say "criu ${version:-(version unknown)} at $(command -v criu) is older than $CRIU_MIN"
        return 1
    fi
    for ((attempt = 1; ; attempt++)); do
        rc=0
        criu_probe || rc=$?
        ((rc != 0)) || return 0
        ((rc != 2)) || return 1
        if ((attempt >= PROBE_ATTEMPTS)); then
            say "criu $version failed its probe $attempt times in a row: not usable"
            return 1
        fi
        say "criu probe attempt $attempt of $PROBE_ATTEMPTS failed (above); again in ${PROBE_PAUSE}s"
        sleep "$PROBE_PAUSE"
    done
}

criu_probe() {
    # 0: usable; 2: a failure no retry can fix; 1: a failure that may be transient.
    local out
    if ! out=$(criu check 2>&1); then
        say "criu check failed: $(tail -n1 <<<"$out")"
        return 1
    fi
    criu_dumps_tcp
}

criu_dumps_tcp() {
    # Dumps (and leaves running) a tiny process that holds a listening TCP socket.
    local dir pid rc=0 error
    dir=$(mktemp -d)
    python3 -c 'import os, socket, sys, time
os.setsid()
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
open(sys.argv[1], "w").close()
time.sleep(60)' "$dir/ready" </dev/null >/dev/null 2>&1 &
    pid=$!
    for _ in {1..600}; do [[ -e $dir/ready ]] && break; sleep 0.05; done
    if [[ ! -e $dir/ready ]]; then
        say "TCP-dump probe: its test process did not start within 30 s"
        rc=1
    elif ! criu dump -t "$pid" -D "$dir" --leave-running -o dump.log >/dev/null 2>&1; then
        error=$(grep -m1 'Error (criu/sockets' "$dir/dump.log" || true)
        if [[ -n $error ]]; then
            rc=2 # the socket bug patch_criu fixes: deterministic
        else
            rc=1
            error=$(grep -m1 'Error' "$dir/dump.log" || tail -n1 "$dir/dump.log")
        fi
        say "criu $(criu --version | sed -n 's/^Version: *//p') cannot dump a TCP socket: $error"
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    return "$rc"
}

write_runc_conf() {
    # runc hands this file to CRIU for every checkpoint and restore: dump live TCP connections
    # (skipping half-open ones) and bring them back closed, since their peers stay behind.
    local option changed=no
    mkdir -p "$(dirname "$RUNC_CONF")"
    touch "$RUNC_CONF"
    for option in tcp-established skip-in-flight tcp-close; do
        grep -qx "$option" "$RUNC_CONF" || { echo "$option" >>"$RUNC_CONF"; changed=yes; }
    done
    [[ $changed == no ]] || say "updated $RUNC_CONF"
}

packages_installed() {
    local status
    status=$(dpkg-query -W -f='${db:Status-Status}\n' "$@" 2>/dev/null) || return 1
    ! grep -qv '^installed$' <<<"$status"
}

apt_updated=no
apt_install() {
    # --no-install-recommends: runc recommends Debian 12's broken criu.
    packages_installed "$@" && return 0
    if [[ $apt_updated == no ]]; then
        say "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        apt_updated=yes
    fi
    say "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

debian_mirror() {
    # The URI of the machine's main Debian archive: the source that serves its own codename.
    local codename=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$codename" 'BEGIN { RS = ""; FS = "\n" } {
            uri = ""; ok = 0; enabled = 1
            for (i = 1; i <= NF; i++) {
                n = split($i, w, /[ \t]+/); key = tolower(w[1])
                if (key == "uris:") uri = w[2]
                if (key == "enabled:") enabled = (tolower(w[2]) != "no")
                if (key == "suites:") for (j = 2; j <= n; j++) if (w[j] == suite) ok = 1
            }
            if (ok && enabled && uri != "") print uri
        }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -e 's/\[[^]]*\]//' "$f" | awk -v suite="$codename" '$1 == "deb" && $3 == suite { print $2 }'
    done
}

fetch_criu_source() {
    local mirror list apt_opts
    mirror=$(debian_mirror "$VERSION_CODENAME")
    mirror=${mirror%%$'\n'*}
    [[ -n $mirror ]] || die "no apt source for suite $VERSION_CODENAME found in /etc/apt"
    say "fetching criu $CRIU_DEB_VERSION source from $mirror (suite trixie)"
    mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial"
    list=$CACHE/apt/trixie-src.list
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$list"
    apt_opts=(-o "Dir::Etc::SourceList=$list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$CACHE/apt/lists" -o "Dir::Cache=$CACHE/apt/cache")
    apt-get "${apt_opts[@]}" -qq update || die "apt-get update of the trixie deb-src list failed"
    # The .dsc may be missing on the mirror (seen as a 404); the verified orig tarball is enough.
    (cd "$CACHE" && apt-get "${apt_opts[@]}" -qq source --download-only "criu=$CRIU_DEB_VERSION") \
        >"$CACHE/apt-source.log" 2>&1 || true
    [[ -f $CACHE/criu_$CRIU_VERSION.orig.tar.xz ]] ||
        die "could not download criu_$CRIU_VERSION.orig.tar.xz: $(tail -n5 "$CACHE/apt-source.log")"
}

patch_criu() {
    # CRIU 4.1.1 cannot dump any TCP socket on Linux >= 6.16, which answers EOPNOTSUPP for
    # SO_PASSCRED/SO_PASSSEC on non-unix sockets (checkpoint-restore/criu#2705, fixed after 4.1.1).
    # Treat that answer as "option not set".
    patch -d "$1" -p1 --quiet <<'PATCH'
--- a/criu/sockets.c
+++ b/criu/sockets.c
@@ -637,6 +637,23 @@
 	return 0;
 }
 
+/* Linux >= 6.16 answers EOPNOTSUPP for SO_PASS{CRED,SEC} on all but unix/netlink sockets. */
+static int dump_pass_opt(int sk, int name, protobuf_c_boolean *has, protobuf_c_boolean *on)
+{
+	int val = 0;
+	socklen_t len = sizeof(val);
+
+	if (getsockopt(sk, SOL_SOCKET, name, &val, &len) < 0) {
+		if (errno == EOPNOTSUPP)
+			return 0;
+		pr_perror("Can't get %d:%d opt", SOL_SOCKET, name);
+		return -1;
+	}
+	*has = true;
+	*on = val ? true : false;
+	return 0;
+}
+
 int dump_socket_opts(int sk, SkOptsEntry *soe)
 {
 	int ret = 0, val;
@@ -676,13 +693,8 @@
 	soe->so_reuseport = val ? true : false;
 	soe->has_so_reuseport = true;
 
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSCRED, &val);
-	soe->has_so_passcred = true;
-	soe->so_passcred = val ? true : false;
-
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSSEC, &val);
-	soe->has_so_passsec = true;
-	soe->so_passsec = val ? true : false;
+	ret |= dump_pass_opt(sk, SO_PASSCRED, &soe->has_so_passcred, &soe->so_passcred);
+	ret |= dump_pass_opt(sk, SO_PASSSEC, &soe->has_so_passsec, &soe->so_passsec);
 
 	ret |= dump_opt(sk, SOL_SOCKET, SO_DONTROUTE, &val);
 	soe->has_so_dontroute = true;
PATCH
}

build_criu() {
    local src=$CACHE/criu-$CRIU_VERSION
    apt_install "${BUILD_DEPS[@]}"
    [[ -f $CACHE/criu_$CRIU_VERSION.orig.tar.xz ]] || fetch_criu_source
    if [[ ! -x $src/criu/criu || ! -e $src/.ferry-patched ]]; then
        rm -rf "$src"
        tar -xJf "$CACHE/criu_$CRIU_VERSION.orig.tar.xz" -C "$CACHE"
        [[ -d $src ]] || die "tarball did not unpack to $src"
        patch_criu "$src" || die "patching criu/sockets.c failed"
        touch "$src/.ferry-patched"
        say "building criu $CRIU_VERSION in $src (make -j2 criu; log: $CACHE/build.log)"
        make -C "$src" -j2 criu >"$CACHE/build.log" 2>&1 ||
            die "criu build failed; see the end of $CACHE/build.log"
    fi
    install -m 0755 "$src/criu/criu" /usr/local/sbin/criu
    say "installed /usr/local/sbin/criu"
}

[[ $EUID -eq 0 ]] || die "must run as root"
[[ -r /etc/os-release ]] || die "/etc/os-release missing: not a Debian system?"
# shellcheck source=/dev/null
. /etc/os-release
write_runc_conf
if packages_installed "${RUNTIME_PACKAGES[@]}" && criu_usable; then
    say "already done: $(criu --version | head -n1), $(podman --version)"
    exit 0
fi

packages_installed "${RUNTIME_PACKAGES[@]}" || apt_install "${RUNTIME_PACKAGES[@]}"
case ${VERSION_ID:-} in
    12) ;; # criu 3.17 fails on kernels >= 6.13 ("Unexpected rt vDSO area bounds")
    13) criu_usable || apt_install criu ;;
    *) die "unsupported Debian version '${VERSION_ID:-unknown}' (need 12 or 13)" ;;
esac
hash -r
if ! criu_usable; then
    # Debian's criu would shadow ours on a PATH without /usr/local/sbin.
    if packages_installed criu; then
        say "removing Debian's criu package: it does not work on this kernel"
        apt-get remove -y -qq criu >/dev/null || die "apt-get remove criu failed"
    fi
    build_criu
fi

hash -r
criu_usable || die "criu at '$(command -v criu || echo nowhere)' is not usable (see above; criu check: $(criu check 2>&1 | tail -n1))"
say "done: $(criu --version | head -n1) at $(command -v criu), $(podman --version), $(runc --version | head -n1)"
