#!/bin/sh
# The boot suite's side inside the booted Debian system (Scripts/lib/boot-suite.sh copies it
# to the 9p share and boots the image once per part). `boot-guest.sh N` runs part N, writes
# one line per check to /harness/checks ("ok N name" or "FAIL N name: why"), and ends the boot
# as the part says: a reboot, a power-off, or a reset in the middle of an upgrade.
#
# The upgrade is a real package upgrade of the root: guard-demo 1 is installed at the first
# boot, and the runs upgrade it to 2 with dpkg, inside guard run, with / snapshotted onto the
# COW device guardvg/rootcow. "Before" is a checksum list of what a package upgrade touches
# (/usr/bin, /usr/sbin, /usr/share/guard-demo, /etc/guard-demo, /var/lib/dpkg, /boot).
set -u
H=/harness
part=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

check() {
  name=$1
  shift
  if out=$("$@" 2>&1); then
    echo "ok $part $name" >>$H/checks
  else
    echo "FAIL $part $name: $(printf '%s' "$out" | tail -n 6 | tr '\n' ' ')" >>$H/checks
  fi
}
sums() {
  find /usr/bin /usr/sbin /usr/share/guard-demo /etc/guard-demo /var/lib/dpkg /boot -xdev -type f 2>/dev/null \
    | grep -v -e '^/var/lib/dpkg/lock' -e '^/var/lib/dpkg/triggers/Lock' | sort | xargs sha256sum
}
same_as() { sums >/tmp/now.sums; diff -u "$1" /tmp/now.sums | head -n 20; cmp -s "$1" /tmp/now.sums; }
# The newest run's number, and a run's field as `guard show --json` prints it.
run_id() { guard history --json | grep -o '"id" *: *[0-9]*' | head -n 1 | grep -o '[0-9]*$'; }
field() { guard show --json "$1" | grep -o "\"$2\" *: *\"[a-z_]*\"" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/'; }
is() { test "$(field "$1" "$2")" = "$3" || { echo "run $1: $2 is '$(field "$1" "$2")', not '$3'"; return 1; }; }
recipe() {  # recipe NAME STEP ON_SUCCESS [MORE KEYS]
  cat >/root/"$1".recipe <<EOF
name: $1
description: upgrade guard-demo on the root filesystem, from the boot suite
volumes:
  - device: /dev/guardvg/root
    mount: /
    snapshot: { size: 700M, cow: /dev/guardvg/rootcow }
steps:
  - name: upgrade guard-demo
    shell: $2
    timeout: 5m
verify:
  - name: guard-demo runs
    run: [guard-demo]
on_success: $3
on_failure: rollback
${4:-}
EOF
}
finish() { sync; echo "part $part done" >>$H/progress; systemctl "$1"; }

case $part in
  1)
    # guard's Debian package, as a newcomer installs it: apt, on the running system. Its
    # housekeeping and metrics work at once, without a reboot.
    check "apt installs guard's package" sh -c "apt-get install -y -q $H/guard_*.deb >/tmp/apt.log 2>&1 || { tail -n 20 /tmp/apt.log; exit 1; }"
    check "the package enabled the boot units" sh -c 'systemctl is-enabled --quiet guard-reassemble.service && systemctl is-enabled --quiet guard-assess.service'
    mkdir -p /var/lib/prometheus/node-exporter
    check "right after the install, guard-maintenance.service succeeds and writes the metrics" sh -c 'systemctl start guard-maintenance.service && ! systemctl is-failed --quiet guard-maintenance.service && grep -q "^guard_kept_runs " /var/lib/prometheus/node-exporter/guard.prom'
    check "the package's monitor runs" systemctl is-active --quiet guard-monitor.service
    # A Type=notify service with a watchdog: systemd saw it ready, and sees its pings.
    check "guard-monitor is a notify service that told systemd it is ready and pings its watchdog" sh -c 'test "$(systemctl show -p Type --value guard-monitor.service)" = notify && test "$(systemctl show -p WatchdogUSec --value guard-monitor.service)" = 1min && sleep 3 && test "$(systemctl show -p WatchdogTimestampMonotonic --value guard-monitor.service)" -gt 0'
    # It writes the metrics itself every minute, once node_exporter's directory is there; the
    # first time as it starts (a restart, so the check does not wait for the minute).
    check "guard-monitor writes the metrics file as it starts" sh -c 'rm -f /var/lib/prometheus/node-exporter/guard.prom; systemctl restart guard-monitor.service; for i in $(seq 75); do grep -q "^guard_runs_started_total " /var/lib/prometheus/node-exporter/guard.prom 2>/dev/null && exit 0; sleep 1; done; exit 1'
    check "guard-assess is required by boot-complete.target (systemd's boot assessment)" test -L /etc/systemd/system/boot-complete.target.requires/guard-assess.service
    check "guard-demo 1 installs" dpkg -i $H/guard-demo_1_all.deb
    check "update-initramfs puts guard into the initramfs" update-initramfs -u
    check "the hook stamped the initramfs" test -s "/var/lib/guard/initramfs/$(uname -r)"
    check "the initramfs holds guard" sh -c 'lsinitramfs /boot/initrd.img-$(uname -r) | grep -q sbin/guard'
    sums >$H/before-1.sums
    # A refusal names what is missing: a COW file for / (the initramfs could not unmount the
    # state volume under it).
    cat >/root/file-cow.recipe <<EOF
name: file-cow
volumes:
  - device: /dev/guardvg/root
    mount: /
    snapshot: { size: 100M }
steps: [{ name: nothing, run: [true] }]
EOF
    check "a COW file for / is refused, naming why" sh -c 'guard check /root/file-cow.recipe 2>&1 | grep -q "needs a COW device"'
    # A separate /boot goes with /: a filesystem mounted on /boot for the moment (it hides the
    # kernels until it is unmounted), and a recipe that leaves it out.
    truncate -s 32M /root/boot.img && mkfs.ext4 -q -F /root/boot.img && mount -o loop /root/boot.img /boot
    recipe boot-left-out true keep
    check "a recipe that snapshots / but not a separate /boot is refused, naming /boot" sh -c 'guard check /root/boot-left-out.recipe 2>&1 | grep -q "snapshots / but not /boot"'
    umount /boot && rm -f /root/boot.img /root/boot-left-out.recipe
    # The upgrades come from a local apt repository that has guard-demo 2 (the test system has
    # no network: that repository is its only source). `guard apt` runs apt-get under
    # /etc/guard/apt.recipe: Recipes/system-apt-upgrade.recipe with this disk's names.
    : >/etc/apt/sources.list
    echo "deb [trusted=yes] file:$H/repo ./" >/etc/apt/sources.list.d/guard-demo.list
    sed -e 's|/dev/vg0/|/dev/guardvg/|g; s|size: 4G|size: 700M|' $H/system-apt-upgrade.recipe >/etc/guard/apt.recipe
    check "guard apt -- install guard-demo upgrades / with apt and keeps the snapshot" guard apt -- install guard-demo
    id=$(run_id)
    check "the run's steps are apt-get's, as guard apt wrote them" sh -c "guard show $id | grep -q 'apt-get install guard-demo'"
    check "guard-demo is 2 after the run" sh -c 'guard-demo | grep -q "version 2"'
    echo "$id" >$H/run-1
    check "guard rollback of a run on / is journaled for the next boot" sh -c "guard rollback $id 2>&1 | grep -q 'rolled back at the next boot'"
    check "the run stays kept until the reboot" is "$id" outcome kept
    finish reboot
    ;;
  2)
    # The initramfs merged / back before mounting it: the old root, at once.
    id=$(cat $H/run-1)
    check "the initramfs ran guard" test -s /run/guard/initramfs
    check "guard-reassemble.service left it to the initramfs and did not fail" sh -c '! systemctl is-failed --quiet guard-reassemble.service && journalctl -b -u guard-reassemble.service | grep -q "the initramfs reassembled"'
    check "/ reads as before run $id (checksums)" same_as $H/before-1.sums
    check "guard-demo is 1 again" sh -c 'guard-demo | grep -q "version 1"'
    check "the merge finishes and is torn down" guard status --wait
    check "guardvg-root is back on its own table" sh -c '! dmsetup table guardvg-root | grep -q snapshot'
    check "run $id is rolled back in the journal" is "$id" outcome rolled_back
    # Power loss during the next upgrade: the step resets the machine after dpkg wrote.
    sums >$H/before-2.sums
    recipe upgrade-crash "dpkg -i $H/guard-demo_2_all.deb && sync && echo crash >$H/progress-crash && echo b > /proc/sysrq-trigger; sleep 60" keep
    echo "part $part reached the reset" >>$H/progress
    guard run /root/upgrade-crash.recipe
    echo "FAIL 2 the reset did not happen" >>$H/checks
    finish poweroff
    ;;
  3)
    check "the initramfs ran guard" test -s /run/guard/initramfs
    check "guard-reassemble.service left it to the initramfs and did not fail" sh -c '! systemctl is-failed --quiet guard-reassemble.service && journalctl -b -u guard-reassemble.service | grep -q "the initramfs reassembled"'
    check "/ reads as before the interrupted run (checksums)" same_as $H/before-2.sums
    check "the reset came after the step had upgraded guard-demo" test -e $H/progress-crash
    check "guard-demo is 1 after the power loss" sh -c 'guard-demo | grep -q "version 1"'
    check "the merge finishes and is torn down" guard status --wait
    id=$(run_id)
    check "the interrupted run $id is recovered in the journal" is "$id" outcome recovered
    # A good upgrade, kept through a reboot: Recipes/system-apt-upgrade.recipe as it is (its
    # own steps: apt-get update, full-upgrade), from the local repository.
    sed -e 's|/dev/vg0/|/dev/guardvg/|g; s|size: 4G|size: 700M|' \
      $H/system-apt-upgrade.recipe >/root/upgrade-good.recipe
    check "guard run of Recipes/system-apt-upgrade.recipe upgrades / with apt and keeps the snapshot" guard run /root/upgrade-good.recipe
    check "apt upgraded guard-demo to 2" sh -c 'guard-demo | grep -q "version 2"'
    run_id >$H/run-3
    sums >$H/after-3.sums
    finish reboot
    ;;
  4)
    id=$(cat $H/run-3)
    check "the kept snapshot of / was stacked before / was mounted" sh -c 'dmsetup table guardvg-root | grep -q snapshot-origin'
    check "/ holds the upgrade (checksums)" same_as $H/after-3.sums
    check "run $id is still kept after the reboot" is "$id" outcome kept
    check "guard commit makes it final" guard commit "$id"
    check "guardvg-root is back on its own table" sh -c '! dmsetup table guardvg-root | grep -q snapshot'
    check "guard-demo is 2" sh -c 'guard-demo | grep -q "version 2"'
    check "guard history shows the three runs" sh -c "test \$(guard history --json | grep -o '\"id\" *:' | wc -l) -eq 3"
    check "run $id is committed" is "$id" outcome committed
    # Boot assessment that fails: guard-demo 3, whose check after the reboot fails.
    sums >$H/before-4.sums
    recipe assess-fail "dpkg -i $H/guard-demo_3_all.deb" keep "verify_after_boot:
  - name: the upgrade left its proof of a good boot
    run: [test, -e, /etc/guard-demo/booted-well]"
    check "guard run with verify_after_boot keeps the run and says to reboot" sh -c 'guard run /root/assess-fail.recipe 2>&1 | grep -q "guard-assess.service runs its verify_after_boot checks"'
    run_id >$H/run-4
    check "guard assess before the reboot leaves the run alone" sh -c "guard assess | grep -q 'not rebooted into yet'"
    finish reboot
    ;;
  5)
    # guard-assess.service runs the check, which fails, journals the rollback for the next
    # boot and reboots: this part may never run (the suite reads the console instead).
    echo "part 5 started" >>$H/progress
    sleep 600
    ;;
  6)
    id=$(cat $H/run-4)
    check "/ reads as before run $id (checksums)" same_as $H/before-4.sums
    check "guard-demo is 2 again" sh -c 'guard-demo | grep -q "version 2"'
    check "the merge finishes and is torn down" guard status --wait
    check "run $id is rolled back in the journal" is "$id" outcome rolled_back
    check "the journal says why: the check after boot failed" sh -c "guard show --json $id | grep -q 'boot-assessed' && guard show --json $id | grep -q 'failed: .the upgrade left its proof'"
    # Boot assessment that never runs: the upgrade breaks the boot (the machine powers off
    # before it is up), and boot_attempts: 1.
    sums >$H/before-6.sums
    # The step installs a unit that powers the machine off before it is up.
    recipe assess-hang "dpkg -i $H/guard-demo_3_all.deb && printf '[Unit]\nDefaultDependencies=no\nAfter=local-fs.target\n[Service]\nType=oneshot\nExecStart=/bin/systemctl poweroff --force --force\n[Install]\nWantedBy=sysinit.target\n' >/etc/systemd/system/broken-boot.service && systemctl enable broken-boot.service" keep "verify_after_boot: [[true]]
boot_attempts: 1"
    check "guard run of the boot-breaking upgrade keeps it for assessment" guard run /root/assess-hang.recipe
    run_id >$H/run-6
    finish reboot
    ;;
  7)
    # The broken boot: powered off before multi-user.target; nothing runs here.
    echo "FAIL 7 the broken boot reached multi-user.target" >>$H/checks
    finish poweroff
    ;;
  8)
    id=$(cat $H/run-6)
    check "/ reads as before run $id (checksums)" same_as $H/before-6.sums
    check "the boot-breaking unit is gone" sh -c '! test -e /etc/systemd/system/broken-boot.service'
    check "guard-demo is 2 again" sh -c 'guard-demo | grep -q "version 2"'
    check "the merge finishes and is torn down" guard status --wait
    check "run $id is rolled back in the journal" is "$id" outcome rolled_back
    check "the journal says why: one boot did not reach the checks" sh -c "guard show --json $id | grep -q 'did not reach the verify_after_boot checks'"
    guard history >$H/history.txt 2>&1
    check "guard history shows the five runs" sh -c "test \$(guard history --json | grep -o '\"id\" *:' | wc -l) -eq 5"
    # Kept runs on volumes that are not /: the data LV of /etc/fstab (its COW file on the state
    # volume), a guard volume backed by a file on /, a thin guard volume. The initramfs leaves
    # them alone (the boot must come up); guard-reassemble-late.service, ordered by guard's
    # generator after /var/lib/guard and before /srv/data, stacks them again.
    head -c 8M /dev/urandom >/srv/data/precious && sync
    sha256sum /srv/data/precious | cut -c1-64 >$H/data-before
    data() {  # data NAME DEVICE MOUNT
      cat >/root/"$1".recipe <<EOF
name: $1
volumes:
  - device: $2
    mount: $3
    snapshot: { size: 8M }
steps:
  - name: rewrite in place
    shell: dd if=/dev/urandom of=$3/precious bs=1M count=2 conv=notrunc,fsync status=none
on_success: keep
on_failure: rollback
EOF
    }
    data data /dev/guardvg/data /srv/data
    check "a kept run on the data LV, its COW file on the state volume" guard run /root/data.recipe
    run_id >$H/run-data
    for volume in site thinvol; do
      if [ $volume = site ]; then
        guard volume create site --backing /srv/site.img --size 16M >/dev/null
      else
        guard volume create thinvol --backing /srv/thin.img --size 32M --thin --pool-size 96M >/dev/null
      fi
      mkfs.ext4 -q /dev/mapper/$volume && mkdir -p /srv/$volume && mount /dev/mapper/$volume /srv/$volume
      head -c 4M /dev/urandom >/srv/$volume/precious && sync
      data $volume /dev/mapper/$volume /srv/$volume
      check "a kept run on the $volume guard volume" guard run /root/$volume.recipe
      run_id >$H/run-$volume
      umount /srv/$volume
    done
    # A volume group whose disk appears late at boot (as an iSCSI disk or a LUKS container
    # unlocked later would): a loop device over /late.img that late-disk.service attaches 15 s
    # after multi-user.target is reached, long after guard's boot units; lvm2's event-based
    # activation activates it. Its LV is in /etc/fstab (nofail) and has a kept run.
    truncate -s 96M /late.img
    late=$(losetup -f --show /late.img)
    pvcreate -q "$late" >/dev/null && vgcreate -q latevg "$late" >/dev/null && lvcreate -q -y -L 40M -n data latevg >/dev/null
    mkfs.ext4 -q /dev/latevg/data && mkdir -p /srv/late
    echo "/dev/latevg/data /srv/late ext4 defaults,nofail,x-systemd.device-timeout=10min 0 2" >>/etc/fstab
    systemctl daemon-reload && mount /srv/late
    head -c 8M /dev/urandom >/srv/late/precious && sync
    sha256sum /srv/late/precious | cut -c1-64 >$H/late-before
    printf '[Unit]\nDescription=the boot suite: a disk that appears late\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sh -c "sleep 15; losetup -f /late.img"\n[Install]\nWantedBy=multi-user.target\n' >/etc/systemd/system/late-disk.service
    systemctl enable --quiet late-disk.service
    data late /dev/latevg/data /srv/late
    check "a kept run on latevg/data, whose disk appears late at the next boot" guard run /root/late.recipe
    run_id >$H/run-late
    check "the run marked latevg/data to be held at boot" sh -c 'test -e "/etc/guard/held/$(dmsetup info -c --noheadings -o uuid latevg-data)"'
    # A run of / whose step fails while the system runs: its rollback waits for the next boot
    # (its initramfs merges / before mounting it), and guard says so; no stop hook runs.
    sums >$H/before-8.sums
    recipe root-fail "dpkg -i $H/guard-demo_3_all.deb && false" keep
    check "a run of / whose step fails is rolled back at the next boot, and says so" sh -c 'guard run /root/root-fail.recipe 2>&1 | grep -q "rolled back at the next boot"'
    run_id >$H/run-root-fail
    check "guard status says what the next boot does" sh -c 'guard status | grep -q "at the next boot: rollback"'
    finish reboot
    ;;
  9)
    # The late disk: lvm2 activates latevg after guard's boot units; udev holds latevg/data
    # (guard's rule) until guard-hold@.service has stacked its snapshot; then it is mounted.
    for _ in $(seq 300); do mountpoint -q /srv/late && break; sleep 1; done
    check "latevg/data was activated after guard's boot units, by lvm2's event-based activation" sh -c '
      late=$(systemctl show -P ActiveEnterTimestampMonotonic guard-reassemble-late.service)
      disk=$(systemctl show -P ExecMainExitTimestampMonotonic late-disk.service)
      dev=$(systemctl show -P ActiveEnterTimestampMonotonic "dev-mapper-latevg\\x2ddata.device")
      echo "boot unit $late, disk attached $disk, device ready $dev"; [ "$late" -lt "$disk" ] && [ "$disk" -lt "$dev" ]'
    check "guard-hold@ stacked the snapshot of latevg/data, then it was mounted" sh -c '
      unit="guard-hold@$(basename "$(readlink -f /dev/mapper/latevg-data)").service"
      journalctl -b -u "$unit" -o short-monotonic | tail -n 5
      held=$(journalctl -b -u "$unit" -o short-monotonic | grep "latevg-data is ready for mounting" | head -n 1 | sed "s/^\[ *\([0-9]*\)\.\([0-9]*\)\].*/\1\2/")
      mounted=$(systemctl show -P ActiveEnterTimestampMonotonic srv-late.mount)
      echo "$unit: ready at ${held:-never} us, mounted at $mounted us"; [ -n "$held" ] && [ "$held" -lt "$mounted" ]'
    check "latevg/data has its kept snapshot under it" sh -c 'dmsetup table latevg-data | grep -q snapshot-origin'
    check "the late run is kept, not stale" is "$(cat $H/run-late)" outcome kept
    check "guard-reassemble-late.service did not fail for the late volume" sh -c '! systemctl is-failed --quiet guard-reassemble-late.service && journalctl -b -u guard-reassemble-late.service | grep -q "waits for its volume to be activated"'
    check "the boot came up: the initramfs's recovery (only / and /usr) succeeded" sh -c 'test "$(cat /run/guard/initramfs)" = 0'
    check "guard-reassemble-late.service ran after /var/lib/guard was mounted and before /srv/data" sh -c '
      systemctl is-active --quiet guard-reassemble-late.service || exit 1
      state=$(systemctl show -P ActiveEnterTimestampMonotonic var-lib-guard.mount)
      late=$(systemctl show -P ActiveEnterTimestampMonotonic guard-reassemble-late.service)
      data=$(systemctl show -P ActiveEnterTimestampMonotonic srv-data.mount)
      echo "state $state late $late data $data"; [ "$state" -lt "$late" ] && [ "$late" -lt "$data" ]'
    check "guardvg-data's kept snapshot was stacked again before it was mounted" sh -c 'dmsetup table guardvg-data | grep -q snapshot-origin'
    check "the file-backed guard volume is active with its kept snapshot" sh -c 'dmsetup table site | grep -q snapshot-origin'
    check "the thin guard volume is active" sh -c 'dmsetup info thinvol >/dev/null'
    check "guard status: nothing needs a person" guard status
    id=$(cat $H/run-root-fail)
    check "/ reads as before the failed run $id (checksums)" same_as $H/before-8.sums
    check "the merge finishes and is torn down" guard status --wait
    check "run $id is rolled back in the journal" is "$id" outcome rolled_back
    check "the data run rolls back to the pre-run file" sh -c "guard rollback --wait $(cat $H/run-data) && test \"\$(sha256sum /srv/data/precious | cut -c1-64)\" = $(cat $H/data-before)"
    check "the guard volumes' kept runs commit" sh -c "guard commit $(cat $H/run-site) && guard commit $(cat $H/run-thinvol)"
    check "the late run rolls back to the pre-run file" sh -c "guard rollback --wait $(cat $H/run-late) && test \"\$(sha256sum /srv/late/precious | cut -c1-64)\" = $(cat $H/late-before)"
    check "e2fsck: latevg/data is clean after its rollback" sh -c 'umount /srv/late && e2fsck -f -n /dev/latevg/data'
    check "no open run keeps a volume held any more" sh -c 'test -z "$(ls -A /etc/guard/held 2>/dev/null)"'
    finish poweroff
    ;;
esac
