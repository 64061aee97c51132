# shellcheck shell=bash
# Boots Debian's kernel under qemu (virtme-ng, software emulation) with the host's root
# filesystem read-only and one writable directory, and runs a command inside as root.
#
#   vm_run OUTDIR MEMORY COMMAND...
#
# GUARD_VM_DISK=FILE attaches FILE as a disk (virtio-scsi, /dev/sda inside): it outlives the VM, as a
# disk outlives a power loss.
#
# The console can mangle long output, so COMMAND writes what matters into OUTDIR (the
# --rwdir); vm_run only returns vng's status. /tmp inside is an overlay in VM memory.

vm_kernel() {
  local k
  k=$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$k" ] || { echo "no Debian kernel in /boot: run Scripts/setup" >&2; return 1; }
  echo "$k"
}

# Whether this host's own kernel has dm-snapshot (then tests run directly as root).
host_has_dm_snapshot() {
  [ "$(id -u)" -eq 0 ] || return 1
  modprobe dm-snapshot 2>/dev/null || true
  grep -q device-mapper /proc/misc 2>/dev/null || return 1
  dmsetup targets 2>/dev/null | grep -q '^snapshot-merge'
}

# virtme-ng from the venv Scripts/setup makes (GUARD_VNG_VENV), else one on PATH.
vm_vng() {
  local venv="${GUARD_VNG_VENV:-/opt/guard-test/vng}"
  if [ -x "$venv/bin/vng" ]; then echo "$venv/bin/vng"; else command -v vng || { echo "virtme-ng is missing: run Scripts/setup" >&2; return 1; }; fi
}

vm_run() {
  local outdir=$1 memory=$2
  shift 2
  local kernel vng
  kernel=$(vm_kernel) || return 1
  vng=$(vm_vng) || return 1
  mkdir -p "$outdir"
  local cmd="modprobe loop max_loop=64 2>/dev/null; modprobe dm-mod; modprobe dm-snapshot; modprobe dm-flakey 2>/dev/null; modprobe dm-thin-pool 2>/dev/null; $*"
  # The kernel suite takes 20 to 50 minutes under emulation, depending on the machine: the
  # bound is for a VM that hangs, not a pass condition.
  timeout --kill-after=10 "${GUARD_VM_TIMEOUT:-4200}" \
    "$vng" --run "$kernel" --disable-kvm --force-9p --cpus "${GUARD_VM_CPUS:-2}" --memory "$memory" \
      ${GUARD_VM_DISK:+--disk "$GUARD_VM_DISK"} --rwdir "$outdir" --exec "$cmd" >"$outdir/console.log" 2>&1
}
