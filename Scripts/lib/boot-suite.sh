# shellcheck shell=bash
# The boot suite: a real Debian system (Scripts/lib/boot-image.sh) with / on LVM, booted under
# qemu (software emulation, as the kernel suite) by its own GRUB, kernel and initramfs, nine
# times on one disk. guard's Debian package is installed into it at the first boot (apt), with
# its initramfs hook;
# Scripts/lib/boot-guest.sh runs each boot's part inside and writes its checks to the share.
#
#   boot_suite RESULTS GUARD_BIN_DIR   # prints "boot suite: N passed, N failed"; fails on any failure
#
# GUARD_BIN_DIR holds guard, guard-watchdog and generate-manual built with the Swift runtime
# linked in (the Debian system has no Swift): `swift build -c release --static-swift-stdlib`.

boot_demo_package() {  # boot_demo_package VERSION OUTDIR
  local version=$1 out=$2 root
  root=$(mktemp -d /tmp/guard-demo-XXXXXX)
  mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/guard-demo" "$root/etc/guard-demo"
  cat >"$root/DEBIAN/control" <<EOF
Package: guard-demo
Version: $version
Architecture: all
Maintainer: guard boot suite <guard@invalid>
Description: the package the boot suite upgrades on /
EOF
  echo /etc/guard-demo/guard-demo.conf >"$root/DEBIAN/conffiles"
  printf '#!/bin/sh\necho "guard-demo version %s"\n' "$version" >"$root/usr/bin/guard-demo"
  chmod 755 "$root/usr/bin/guard-demo"
  head -c $((version * 300000)) /dev/urandom >"$root/usr/share/guard-demo/data"
  echo "setting=$version" >"$root/etc/guard-demo/guard-demo.conf"
  dpkg-deb --root-owner-group -b "$root" "$out/guard-demo_${version}_all.deb" >/dev/null
  rm -rf "$root"
}

boot_suite() {
  local results=$1 bins=$2 image work share disk part status=0
  image=$(boot_image) || return 1
  work="$results/boot"
  share="$work/share"
  mkdir -p "$share"
  : >"$share/checks"
  disk="$work/disk.qcow2"
  qemu-img create -q -f qcow2 -b "$image" -F raw "$disk"
  # guard as a Debian package (Scripts/package-deb), which boot 1 installs with apt.
  GUARD_INSTALL_FROM="$bins" Scripts/package-deb "$share" >"$work/install.log" 2>&1 || {
    echo "boot suite: Scripts/package-deb failed:" >&2; tail -n 20 "$work/install.log" >&2; return 1; }
  boot_demo_package 1 "$share"
  boot_demo_package 2 "$share"
  boot_demo_package 3 "$share"
  # A local apt repository with guard-demo 2, for the apt upgrade (Recipes/system-apt-upgrade.recipe).
  mkdir -p "$share/repo"
  cp "$share/guard-demo_2_all.deb" "$share/repo/"
  (cd "$share/repo" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages)
  cp Recipes/system-apt-upgrade.recipe "$share/"
  cp Scripts/lib/boot-guest.sh "$share/guest.sh"
  chmod 755 "$share/guest.sh"
  for part in 1 2 3 4 5 6 7 8 9; do
    printf '#!/bin/sh\nexec /harness/guest.sh %s\n' "$part" >"$share/boot.sh"
    chmod 755 "$share/boot.sh"
    local started=$SECONDS
    # -no-reboot: a reboot or a reset ends qemu, and the next part boots the same disk.
    timeout --kill-after=10 "${GUARD_BOOT_TIMEOUT:-900}" qemu-system-x86_64 -machine pc -accel tcg -cpu max -smp 2 -m 2048 \
      -display none -monitor none -serial "file:$work/console-$part.log" -no-reboot \
      -drive "file=$disk,if=virtio,format=qcow2" \
      -virtfs "local,path=$share,mount_tag=harness,security_model=none,id=harness" \
      >"$work/qemu-$part.log" 2>&1 || true
    echo "boot $part: $((SECONDS - started)) s"
    cp "$share/boot.log" "$work/boot-$part.log" 2>/dev/null || true
    # From the second boot on, the initramfs must have run guard before it mounted /.
    if [ "$part" -gt 1 ]; then
      # The initramfs prints "guard: reassembling snapshots ...", then a line per run (runs it
      # leaves to the system come first), before the root file system is checked.
      if awk '/guard: reassembling snapshots/ {if (!g) g=NR}
              g && !r && /reassembled the snapshot of guardvg-root/ {a=NR}
              /Will now check root file system/ {if (!r) r=NR}
              END {exit !(g && a && r && g <= a && a < r)}' "$work/console-$part.log"; then
        echo "ok $part console: the initramfs reassembled guardvg-root before it checked and mounted /" >>"$share/checks"
      else
        echo "FAIL $part console: no reassembly of guardvg-root by the initramfs before / was mounted (console-$part.log)" >>"$share/checks"
      fi
    fi
    # No guard process crashed in this boot (a Swift trap or a fault shows on the console as
    # "traps: ... in guard[...]" or "segfault at ... in guard[...]").
    if grep -aE '(traps|segfault).* in guard(-watchdog)?\[' "$work/console-$part.log" >"$work/crashes-$part.log"; then
      echo "FAIL $part console: a guard process crashed: $(head -n 1 "$work/crashes-$part.log")" >>"$share/checks"
    else
      echo "ok $part console: no guard process crashed" >>"$share/checks"
    fi
    # Boots that end before the suite's unit runs: what they show on the console instead.
    local expect=
    case $part in
      5) expect="verify_after_boot failed" ;;          # guard-assess.service, then its reboot
      7) expect="boot 1 of 1 into the upgrade" ;;      # counted by the initramfs, then the broken boot
    esac
    if [ -n "$expect" ]; then
      if grep -aq "$expect" "$work/console-$part.log"; then
        echo "ok $part console: $expect" >>"$share/checks"
      else
        echo "FAIL $part console: no '$expect' (console-$part.log)" >>"$share/checks"
        tail -n 40 "$work/console-$part.log" >&2
        break
      fi
    elif ! grep -q "^part $part " "$share/progress" 2>/dev/null; then
      echo "FAIL $part the boot did not reach its part's end (console: $work/console-$part.log)" >>"$share/checks"
      tail -n 40 "$work/console-$part.log" >&2
      break
    fi
  done
  local passed failed
  passed=$(grep -c '^ok ' "$share/checks" || true)
  failed=$(grep -c '^FAIL ' "$share/checks" || true)
  sed 's/^/  /' "$share/checks"
  echo "boot suite: $passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ] || status=1
  return $status
}
