# shellcheck shell=bash
# Builds (once, then cached) the Debian system the boot suite boots: bookworm from Debian's
# packages (mmdebstrap), its own kernel, initramfs-tools and GRUB, on one disk:
#
#   /dev/vda1  LVM physical volume, volume group guardvg
#     guardvg/root     2 GiB   ext4, /        (/boot is a directory on it: a rollback of / restores it)
#     guardvg/state    256 MiB ext4, /var/lib/guard (guard's journal: the initramfs mounts it)
#     guardvg/rootcow  768 MiB the COW device the boot suite's recipes name for /
#     guardvg/data      96 MiB ext4, /srv/data (a data volume of /etc/fstab, with a kept run
#                              whose COW file is on the state volume)
#
# GRUB (i386-pc, BIOS) reads the kernel and the initramfs from the root LV, as on a real
# machine. A unit, guard-harness.service, mounts the 9p share `harness` at /harness at the end
# of each boot and runs /harness/boot.sh if there is one: that is how the suite talks to it.
#
#   boot_image PATH      # prints the path of the cached raw image, building it if needed
#
# The image is cached in GUARD_BOOT_CACHE (default /var/cache/guard-test), keyed by this
# file's checksum: a change here builds a new image.

boot_image_build() {
  local image=$1 work
  work=$(mktemp -d /tmp/guard-bootimg-XXXXXX)
  echo "== boot suite: building the Debian image (mmdebstrap, then a VM to partition it and install GRUB)" >&2
  mmdebstrap --quiet --variant=minbase \
    --include=systemd-sysv,udev,lvm2,linux-image-amd64,initramfs-tools,e2fsprogs,kmod,procps,util-linux,zstd,libsqlite3-0,libstdc++6,grub-pc-bin,grub2-common,dmsetup,thin-provisioning-tools \
    bookworm "$work/root.tar" http://deb.debian.org/debian >"$work/mmdebstrap.log" 2>&1 || {
    tail -n 20 "$work/mmdebstrap.log" >&2; return 1; }
  cat >"$work/assemble.sh" <<'EOF'
set -eux
out=$(dirname "$0")
disk=
for d in /dev/vda /dev/sda; do [ -b "$d" ] && [ "$(blockdev --getsize64 "$d")" = 4294967296 ] && disk=$d; done
[ -n "$disk" ]
echo 'start=2048, type=8e' | sfdisk --quiet "$disk"
udevadm settle || true
part=${disk}1
pvcreate -q "$part"
vgcreate -q guardvg "$part"
lvcreate -q -y -L 2G -n root guardvg
lvcreate -q -y -L 256M -n state guardvg
lvcreate -q -y -L 768M -n rootcow guardvg
lvcreate -q -y -L 96M -n data guardvg
mkfs.ext4 -q -L root /dev/guardvg/root
mkfs.ext4 -q -L guard-state /dev/guardvg/state
mkfs.ext4 -q -L data /dev/guardvg/data
r=/tmp/r
mkdir -p $r
mount /dev/guardvg/root $r
tar -xpf "$out/root.tar" -C $r
mkdir -p $r/var/lib/guard
mount /dev/guardvg/state $r/var/lib/guard
cat >$r/etc/fstab <<FSTAB
/dev/mapper/guardvg-root  /               ext4  errors=remount-ro  0 1
/dev/mapper/guardvg-state /var/lib/guard  ext4  defaults           0 2
/dev/mapper/guardvg-data  /srv/data       ext4  defaults           0 2
FSTAB
mkdir -p $r/srv/data
echo guardboot >$r/etc/hostname
echo 'root:guard' | chroot $r chpasswd
cat >$r/etc/default/grub <<GRUB
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200 systemd.show_status=1"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB
mkdir -p $r/usr/local/lib/guard-harness
cat >$r/usr/local/lib/guard-harness/run <<'RUN'
#!/bin/sh
# Runs the boot suite's instructions for this boot: /harness/boot.sh on the 9p share.
modprobe 9pnet_virtio 2>/dev/null
mkdir -p /harness
mount -t 9p -o trans=virtio,version=9p2000.L harness /harness || { echo "guard-harness: no 9p share" >/dev/console; exit 0; }
if [ -x /harness/boot.sh ]; then
  echo "guard-harness: running boot.sh" >/dev/console
  /harness/boot.sh >/harness/boot.log 2>&1
  echo "guard-harness: boot.sh exited $?" >/dev/console
fi
RUN
chmod 755 $r/usr/local/lib/guard-harness/run
cat >$r/etc/systemd/system/guard-harness.service <<UNIT
[Unit]
Description=guard boot suite: run this boot's instructions from the 9p share
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/lib/guard-harness/run
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/guard-harness.service $r/etc/systemd/system/multi-user.target.wants/guard-harness.service
for d in dev proc sys run; do mount --bind /$d $r/$d; done
chroot $r grub-install --target=i386-pc "$disk"
chroot $r update-grub
# The initramfs mmdebstrap built (MODULES=most) boots it; later ones (guard's hook, at the
# first boot) take only what this machine needs: under emulation that is minutes faster.
sed -i 's/^MODULES=.*/MODULES=dep/' $r/etc/initramfs-tools/initramfs.conf
for d in dev proc sys run; do umount $r/$d; done
umount $r/var/lib/guard
umount $r
vgchange -an guardvg
echo assembled >"$out/assembled"
EOF
  truncate -s 4G "$work/disk.raw"
  local status=0
  GUARD_VM_DISK="$work/disk.raw" GUARD_VM_TIMEOUT=1200 vm_run "$work" 2G "bash $work/assemble.sh > $work/assemble.log 2>&1" || status=$?
  if [ ! -e "$work/assembled" ]; then
    echo "boot suite: the image was not assembled (vng exit $status); last lines:" >&2
    tail -n 30 "$work/assemble.log" >&2 2>/dev/null || tail -n 30 "$work/console.log" >&2
    return 1
  fi
  mkdir -p "$(dirname "$image")"
  mv "$work/disk.raw" "$image.tmp" && mv "$image.tmp" "$image"
  rm -rf "$work"
}

boot_image() {
  local cache=${GUARD_BOOT_CACHE:-/var/cache/guard-test} key
  key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
  local image="$cache/debian-bookworm-lvm-$key.raw"
  if [ ! -s "$image" ]; then
    boot_image_build "$image" || return 1
  fi
  echo "$image"
}
