# shellcheck shell=bash
# The newcomer test (Scripts/test --newcomer): the README's first steps on a stock Debian 12
# (or 13: GUARD_NEWCOMER_SUITE=trixie).
#
# A stock bookworm root filesystem (mmdebstrap, Debian's own python3; cached, as the boot
# image is), the checkout copied in, then in a chroot:
#   1. Scripts/setup without Swift: it installs the Debian packages and the Python tools (into
#      venvs of the project's own: Debian's interpreter refuses pip, PEP 668), then stops and
#      says where to get Swift 6.3;
#   2. with the Swift toolchain at /opt/swift (bind-mounted from this machine, as a newcomer
#      unpacks it), Scripts/setup again: ready;
#   3. guard built there, and its --version;
#   4. the Debian package built there (Scripts/package-deb) installed with apt.
# Each step prints "ok NAME" or "FAIL NAME: why"; the function fails on any failure.
#
#   newcomer_test RESULTS

# GUARD_NEWCOMER_SUITE=trixie plays it on Debian 13 (default bookworm, Debian 12).
newcomer_suite=${GUARD_NEWCOMER_SUITE:-bookworm}

newcomer_rootfs() {
  local cache=${GUARD_BOOT_CACHE:-/var/cache/guard-test} key tarball
  key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
  tarball="$cache/debian-$newcomer_suite-stock-$key.tar"   # --format=tar: mmdebstrap reads the format from a name ending .tar, and the .tmp name is not
  if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    echo "== newcomer: a stock Debian $newcomer_suite root filesystem (mmdebstrap)" >&2
    mmdebstrap --quiet --format=tar --variant=standard --include=ca-certificates,git,sudo \
      "$newcomer_suite" "$tarball.tmp" http://deb.debian.org/debian >"$cache/newcomer-mmdebstrap.log" 2>&1 || {
      tail -n 20 "$cache/newcomer-mmdebstrap.log" >&2; rm -f "$tarball.tmp"; return 1; }
    mv "$tarball.tmp" "$tarball"
  fi
  echo "$tarball"
}

newcomer_test() {
  local results=$1 tarball root failed=0 out
  tarball=$(newcomer_rootfs) || return 1
  root=$(mktemp -d /tmp/guard-newcomer-XXXXXX)
  out="$results/newcomer"
  mkdir -p "$out"
  : >"$out/checks"
  tar -xf "$tarball" -C "$root"
  # The checkout, as a newcomer clones it (no build products).
  mkdir -p "$root/root/guard"
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$root/root/guard"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # This network's trust, not the newcomer's: where the host reaches Debian and PyPI through a
  # proxy with a CA of its own, the chroot trusts the host's bundle as an admin there would
  # (a local CA, then update-ca-certificates). On an ordinary network this adds nothing new.
  cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/guard-test-host-bundle.crt"
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  # And pip's, where the host names a bundle for it (a pip that carries certifi's own does not
  # read the system's).
  if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$root/etc/pip.conf"; fi
  # A chroot starts no services (PostgreSQL's postinst would start a server that outlives it).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" && chmod 755 "$root/usr/sbin/policy-rc.d"
  local mounted=()
  for d in dev proc sys; do mount --bind "/$d" "$root/$d" && mounted+=("$root/$d"); done
  cleanup_newcomer() {
    local m
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null; done
    rm -rf "$root"
  }
  inside() { chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
  step_log() { echo "$out/$(echo "$1" | tr -c 'a-z0-9\n' '-').log"; }  # a step's log, by its name
  step() {  # step NAME EXPECTED_STATUS COMMAND...
    local name=$1 expected=$2 status=0
    shift 2
    inside sh -c "cd /root/guard && $*" >"$(step_log "$name")" 2>&1 || status=$?
    if [ "$status" = "$expected" ]; then
      echo "ok $name" >>"$out/checks"
    else
      echo "FAIL $name: exit $status, not $expected (last lines: $(tail -n 4 "$(step_log "$name")" | tr '\n' ' '))" >>"$out/checks"
      failed=1
    fi
  }
  # Debian's own interpreter refuses pip into it (PEP 668): the setup must not try.
  step "Debian's python3 is externally managed" 0 "ls /usr/lib/python3*/EXTERNALLY-MANAGED"
  step "Scripts/setup without Swift stops and says where to get it" 1 "Scripts/setup"
  if grep -q "https://www.swift.org/install/linux/" "$(step_log "Scripts/setup without Swift stops and says where to get it")"; then
    echo "ok the message names swift.org's Linux downloads" >>"$out/checks"
  else
    echo "FAIL the message names swift.org's Linux downloads" >>"$out/checks"; failed=1
  fi
  # The toolchain where the message says to unpack it, and the Swift packages from this
  # machine's mirror (a newcomer's machine has GitHub).
  mkdir -p "$root/opt/swift" "$root/opt/swift-packages"
  mount --bind /opt/swift "$root/opt/swift" && mounted+=("$root/opt/swift")
  mount --bind /opt/swift-packages "$root/opt/swift-packages" && mounted+=("$root/opt/swift-packages")
  for prefix in https://github.com/ git@github.com: ssh://git@github.com/; do
    inside git config --system --add "url./opt/swift-packages/.insteadOf" "$prefix"
  done
  # What swift.org's instructions (and the setup's message) have a newcomer install for the toolchain.
  # The list as setup's message prints it for this release (its GCC's libraries).
  local gcc=12
  [ "$newcomer_suite" = trixie ] && gcc=14
  step "the Swift toolchain's own dependencies install" 0 "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends binutils git gnupg2 libc6-dev libcurl4-openssl-dev libedit2 libgcc-$gcc-dev libpython3-dev libsqlite3-0 libncurses6 libstdc++-$gcc-dev libxml2-dev libz3-dev pkg-config tzdata unzip zlib1g-dev >/dev/null"
  if ! grep -q "libgcc-$gcc-dev" "$(step_log "Scripts/setup without Swift stops and says where to get it")"; then
    echo "FAIL setup's message names this release's libgcc-$gcc-dev" >>"$out/checks"; failed=1
  else
    echo "ok setup's message names this release's libgcc-$gcc-dev" >>"$out/checks"
  fi
  step "Scripts/setup with Swift 6.3 at /opt/swift is ready" 0 "Scripts/setup"
  step "guard builds" 0 "/opt/swift/usr/bin/swift build --product guard"
  step "guard --version" 0 ".build/debug/guard --version"
  step "the Debian package builds (Scripts/package-deb)" 0 "Scripts/package-deb /root"
  step "apt installs it" 0 "DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/guard_*.deb && /usr/sbin/guard --version"
  cleanup_newcomer
  sed 's/^/  /' "$out/checks"
  echo "newcomer test: $(grep -c '^ok ' "$out/checks") passed, $(grep -c '^FAIL ' "$out/checks") failed (logs: $out)"
  return $failed
}
