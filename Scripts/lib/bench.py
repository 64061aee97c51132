#!/usr/bin/env python3
"""guard's benchmarks, run as root on a kernel with device-mapper (Scripts/bench starts it,
in the VM where the host kernel has none). guard and the alternatives (lvm2's commands, a
copy-back by hand) run on identical volumes in the same run; results are written as JSON.

    bench.py GUARD_BINARY OUTPUT.json [--trials N] [--quick] [--only stall,restore,thin,...]
"""
import json, os, random, re, statistics, subprocess, sys, tempfile, threading, time

GUARD = sys.argv[1]
OUTPUT = sys.argv[2]
TRIALS = int(sys.argv[sys.argv.index("--trials") + 1]) if "--trials" in sys.argv else 5
QUICK = "--quick" in sys.argv
os.environ["LVM_SUPPRESS_FD_WARNINGS"] = "1"
os.environ["NO_COLOR"] = "1"

WORK = tempfile.mkdtemp(prefix="guard-bench-")
STATE = os.path.join(WORK, "state")
# A name of its own: never an admin's volume group (Scripts/bench may run directly on a host with device-mapper).
VG = "guardbench%06x" % random.getrandbits(24)
results = {"trials": TRIALS, "kernel": os.uname().release, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def sh(command, check=True, capture=True):
    run = subprocess.run(command, shell=True, text=True, capture_output=capture)
    if check and run.returncode != 0:
        raise RuntimeError("%s exited %d: %s" % (command, run.returncode, run.stderr))
    return run.stdout if capture else ""


def guard(*args, check=True):
    run = subprocess.run([GUARD, *args, "--state-dir", STATE], text=True, capture_output=True)
    if check and run.returncode not in (0,):
        raise RuntimeError("guard %s exited %d: %s" % (" ".join(args), run.returncode, run.stderr))
    return run


def timed(function):
    start = time.monotonic()
    value = function()
    return time.monotonic() - start, value


def summary(values):
    return {"median": statistics.median(values), "worst": max(values), "samples": values}


def ratio(guard_value, other_value):
    return guard_value / other_value if other_value else None


def log(text):
    print(text, file=sys.stderr, flush=True)


def recipe(name, device, mount, steps="  - name: nothing\n    run: [/bin/true]\n", size="256M", on_success="commit", verify="", chunk="", extra=""):
    path = os.path.join(WORK, name + ".recipe")
    with open(path, "w") as f:
        f.write("name: %s\nvolumes:\n  - device: %s\n%s    snapshot: { size: %s%s }\nsteps:\n%s%son_success: %s\non_failure: rollback\n%s"
                % (name, device, ("    mount: %s\n" % mount) if mount else "", size, (", chunk: %s" % chunk) if chunk else "", steps, verify, on_success, extra))
    os.chmod(path, 0o644)
    return path


# ------------------------------------------------------------------ setup: one VG, identical LVs
def setup():
    """The volume group on one disk image; guard's state directory (its journal and COW
    files, /var/lib/guard on a server) on an ext4 filesystem of a second one, as on a disk.
    (In VM memory, tmpfs, preallocating a COW file would clear every page of it: a cost no
    disk filesystem has, and none of lvm2's.) Returns both loop devices."""
    os.makedirs(STATE, exist_ok=True)
    size_gib = 2 if QUICK else 5
    image = os.path.join(WORK, "pv.img")
    sh("truncate -s %dG %s" % (size_gib, image))
    loop = sh("losetup -f --show %s" % image).strip()
    sh("pvcreate -q %s && vgcreate -q %s %s" % (loop, VG, loop))
    state_image = os.path.join(WORK, "state.img")
    sh("truncate -s 3G %s" % state_image)
    state_loop = sh("losetup -f --show %s" % state_image).strip()
    sh("mkfs.ext4 -q -F %s && mount %s %s" % (state_loop, state_loop, STATE))
    return loop, state_loop


def make_lv(name, size="1G", filesystem=True, mount=None):
    sh("lvcreate -q -y -L %s -n %s %s" % (size, name, VG))
    device = "/dev/mapper/%s-%s" % (VG, name.replace("-", "--"))
    if filesystem:
        sh("mkfs.ext4 -q -F %s" % device)
        if mount:
            os.makedirs(mount, exist_ok=True)
            sh("mount %s %s" % (device, mount))
    return device


# ------------------------------------------------------------------ 1. service stall during the snapshot
class Writer(threading.Thread):
    """Small synchronous writes to a file on the volume; records each write's latency."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.latencies, self.running = path, [], True

    def run(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        block = os.urandom(4096)
        offset = 0
        while self.running:
            start = time.monotonic()
            os.pwrite(fd, block, offset)
            os.fdatasync(fd)
            self.latencies.append(time.monotonic() - start)
            offset = (offset + 4096) % (8 << 20)
        os.close(fd)

    def stall_during(self, action):
        """Runs `action` while writing; returns (longest write in ms during it, the action's result)."""
        before = len(self.latencies)
        value = action()
        time.sleep(0.3)
        during = self.latencies[before:]
        return (max(during) * 1000 if during else 0.0), value


def libdevmapper_suspend_resume(name):
    """A bare suspend (flush, freeze) and resume of one device with no table change, in one
    process through libdevmapper: the physical floor of any snapshot window."""
    import ctypes
    dm = ctypes.CDLL("libdevmapper.so.1.02.1")
    dm.dm_task_create.restype = ctypes.c_void_p
    dm.dm_task_create.argtypes = [ctypes.c_int]
    dm.dm_task_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    dm.dm_task_set_cookie.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint16]
    dm.dm_task_run.argtypes = [ctypes.c_void_p]
    dm.dm_task_destroy.argtypes = [ctypes.c_void_p]
    dm.dm_udev_wait.argtypes = [ctypes.c_uint32]
    for task_type in (4, 5):  # DM_DEVICE_SUSPEND, DM_DEVICE_RESUME
        # The resume carries a udev cookie, as dmsetup's does: without one, udev's rules drop
        # the device's /dev/mapper link. The wait follows the resume (the writer is running again).
        cookie = ctypes.c_uint32(0)
        task = dm.dm_task_create(task_type)
        ok = dm.dm_task_set_name(task, name.encode()) and (task_type == 4 or dm.dm_task_set_cookie(task, ctypes.byref(cookie), 0)) and dm.dm_task_run(task)
        dm.dm_task_destroy(task)
        if task_type == 5 and cookie.value:
            dm.dm_udev_wait(cookie)
        if not ok:
            raise RuntimeError("libdevmapper %s of %s failed" % ("suspend" if task_type == 4 else "resume", name))


def stall_of(mount, action):
    writer = Writer(os.path.join(mount, "w"))
    writer.start()
    time.sleep(0.5)
    stall, _ = writer.stall_during(action)
    writer.running = False
    writer.join()
    return stall


def window_parts(run_id):
    """The two parts of guard's window, from the run's journaled take event (ms)."""
    show = json.loads(guard("show", "--json", str(run_id)).stdout)
    for event in show["events"]:
        match = re.search(r"suspend and freeze (\d+) µs, resumes (\d+) µs", event.get("detail") or "")
        if event["action"] == "take" and event["kind"] == "result" and match:
            return int(match.group(1)) / 1000.0, int(match.group(2)) / 1000.0
    raise RuntimeError("run %s journaled no window parts" % run_id)


def bench_stall():
    log("1. service stall while a snapshot is taken")
    guard_mount, lvm_mount = os.path.join(WORK, "stall-guard"), os.path.join(WORK, "stall-lvm")
    guard_lv = make_lv("stallguard", "1G", mount=guard_mount)
    make_lv("stalllvm", "1G", mount=lvm_mount)
    path = recipe("stall", guard_lv, guard_mount)
    stalls = {"guard": [], "lvcreate": [], "guard_suspend_us": [], "guard_suspend_part": [], "guard_resume_part": [],
              "dmsetup_suspend_resume": [], "libdevmapper_suspend_resume": []}
    for trial in range(TRIALS):
        stalls["guard"].append(stall_of(guard_mount, lambda: guard("run", path)))
        last = json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]
        stalls["guard_suspend_us"].append(last["suspend_us"] / 1000.0)
        suspend_part, resume_part = window_parts(last["id"])
        stalls["guard_suspend_part"].append(suspend_part)
        stalls["guard_resume_part"].append(resume_part)
        # The physical floor, on the same volume: a bare suspend and resume, no table change.
        stalls["dmsetup_suspend_resume"].append(stall_of(guard_mount, lambda: sh("dmsetup suspend %s && dmsetup resume %s" % (guard_lv, guard_lv))))
        stalls["libdevmapper_suspend_resume"].append(stall_of(guard_mount, lambda: libdevmapper_suspend_resume(os.path.basename(guard_lv))))
        if not os.path.exists(guard_lv):
            raise RuntimeError("%s is gone after the bare suspend and resume (udev dropped its link)" % guard_lv)

        stalls["lvcreate"].append(stall_of(lvm_mount, lambda: sh("lvcreate -q -s -L 256M -n stallsnap %s/stalllvm" % VG)))
        sh("lvremove -q -f %s/stallsnap" % VG)
        log("   trial %d: guard %.1f ms (window %.1f ms: suspend %.1f, resumes %.1f), lvcreate -s %.1f ms, dmsetup suspend+resume %.1f ms, libdevmapper suspend+resume %.1f ms"
            % (trial + 1, stalls["guard"][-1], stalls["guard_suspend_us"][-1], stalls["guard_suspend_part"][-1], stalls["guard_resume_part"][-1],
               stalls["lvcreate"][-1], stalls["dmsetup_suspend_resume"][-1], stalls["libdevmapper_suspend_resume"][-1]))
    results["stall_ms"] = {
        "guard": summary(stalls["guard"]),
        "lvcreate_s": summary(stalls["lvcreate"]),
        "guard_suspend_window": summary(stalls["guard_suspend_us"]),
        "guard_window_suspend_part": summary(stalls["guard_suspend_part"]),
        "guard_window_resume_part": summary(stalls["guard_resume_part"]),
        "dmsetup_suspend_resume": summary(stalls["dmsetup_suspend_resume"]),
        "libdevmapper_suspend_resume": summary(stalls["libdevmapper_suspend_resume"]),
        "ratio_median": ratio(statistics.median(stalls["guard"]), statistics.median(stalls["lvcreate"])),
        "ratio_worst": ratio(max(stalls["guard"]), max(stalls["lvcreate"])),
        "ratio_vs_dmsetup_median": ratio(statistics.median(stalls["guard"]), statistics.median(stalls["dmsetup_suspend_resume"])),
        "ratio_vs_libdevmapper_median": ratio(statistics.median(stalls["guard"]), statistics.median(stalls["libdevmapper_suspend_resume"])),
        "goal": "guard's stall at most half of lvcreate's (ratio <= 0.5, median and worst); within 2x of a bare dmsetup suspend/resume",
    }
    sh("umount %s %s" % (guard_mount, lvm_mount))
    sh("lvremove -q -f %s/stallguard %s/stalllvm" % (VG, VG))


# ------------------------------------------------------------------ 2. time until the old data is back
def fill_changes(mount, mebibytes):
    """A bad upgrade: rewrites `mebibytes` MiB of files in place."""
    sh("for i in $(seq 1 %d); do dd if=/dev/urandom of=%s/file$i bs=1M count=1 conv=notrunc status=none; done; sync" % (mebibytes, mount))


def write_files(mount, mebibytes):
    """The volume's data before the upgrade: `mebibytes` files of 1 MiB."""
    sh("for i in $(seq 1 %d); do dd if=/dev/urandom of=%s/file$i bs=1M count=1 status=none; done; sync" % (mebibytes, mount))


# The service is started again by the rollback's start hook, which runs once the volume is
# mounted with the old data: the time it prints (the journal keeps a hook's output) is when
# the service sees the old data again. It is one program, as a service's start command is; no shell.
SERVICE_HOOK = "rollback:\n  start:\n    - name: the service starts\n      run: [date, '+%s.%N']\n"


def guard_kept_rollback(name, device, mount, size, cow_size):
    """A kept run of the bad upgrade (rewriting `size` MiB), then `guard rollback` of it.
    Returns the rollback command's seconds, and what `service_back` needs."""
    steps = "  - name: bad upgrade\n    shell: for i in $(seq 1 %d); do dd if=/dev/urandom of=%s/file$i bs=1M count=1 conv=notrunc status=none; done; sync\n" % (size, mount)
    guard("run", recipe(name, device, mount, steps=steps, size=cow_size, on_success="keep", extra=SERVICE_HOOK))
    run_id = json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]["id"]
    wall = time.time()
    seconds, _ = timed(lambda: guard("rollback", str(run_id)))
    return seconds, (run_id, wall)


def service_back(rollback):
    """Seconds from the rollback command's start to the start hook's program running."""
    run_id, wall = rollback
    hooks = [step for step in json.loads(guard("show", "--json", str(run_id)).stdout)["steps"] if step["kind"] == "rollback-start"]
    return float(hooks[-1]["stdout_tail"].strip()) - wall


def lvconvert_merge(name, size_mib, changed):
    """lvm2: lvcreate -s, the bad upgrade, then `umount; lvconvert --merge` as its man page runs
    it (lvconvert waits for the merge); `mount`. Returns the seconds from umount to mounted."""
    mount = os.path.join(WORK, "restore-" + name)
    make_lv(name, "%dM" % size_mib, mount=mount)
    write_files(mount, changed)
    sh("lvcreate -q -s -L %dM -n %ssnap %s/%s" % (changed * 2 + 32, name, VG, name))
    fill_changes(mount, changed)
    seconds, _ = timed(lambda: sh("umount %s && lvconvert -q --merge %s/%ssnap && mount /dev/mapper/%s-%s %s" % (mount, VG, name, VG, name, mount)))
    sh("umount %s; lvremove -q -f %s/%s" % (mount, VG, name))
    return seconds


def bench_restore():
    log("2. time until the service sees the old data again")
    sizes = [16, 64] if QUICK else [16, 64, 256]
    out = {}
    for size in sizes:
        rows = {"guard_service_back": [], "guard_rollback": [], "guard_merge_complete": [], "lvconvert_merge": [], "copy_back": [], "raw_copy": [], "umount_alone": []}
        for trial in range(TRIALS if not QUICK else 1):
            # guard: a kept run rolled back; the command returns a little after the service is
            # back, once udev has also finished with the devices.
            mount = os.path.join(WORK, "restore-guard")
            device = make_lv("rguard", "1G", mount=mount)
            write_files(mount, size)
            seconds, rollback = guard_kept_rollback("restore", device, mount, size, "%dM" % (size * 2 + 32))
            rows["guard_rollback"].append(seconds)
            seconds, _ = timed(lambda: guard("status", "--wait"))
            rows["guard_merge_complete"].append(rows["guard_rollback"][-1] + seconds)
            rows["guard_service_back"].append(service_back(rollback))
            sh("umount %s" % mount)
            sh("lvremove -q -f %s/rguard" % VG)

            rows["lvconvert_merge"].append(lvconvert_merge("rlvm", 1024, size))

            # The tutorial's copy-back: mount the snapshot, copy the changed files back.
            mount = os.path.join(WORK, "restore-copy")
            snap_mount = os.path.join(WORK, "restore-copy-snap")
            os.makedirs(snap_mount, exist_ok=True)
            make_lv("rcopy", "1G", mount=mount)
            write_files(mount, size)
            sh("lvcreate -q -s -L %dM -n rcsnap %s/rcopy" % (size * 2 + 32, VG))
            fill_changes(mount, size)
            seconds, _ = timed(lambda: sh("mount -o ro /dev/mapper/%s-rcsnap %s && cp -a %s/. %s/ && sync && umount %s" % (VG, snap_mount, snap_mount, mount, snap_mount)))
            rows["copy_back"].append(seconds)
            # The physical floor: copying the changed bytes once.
            # (written to a volume of its own: writing it into the origin would fill the snapshot's COW)
            make_lv("rawdst", "%dM" % (size + 4), filesystem=False)
            seconds, _ = timed(lambda: sh("dd if=/dev/mapper/%s-rcsnap of=/dev/mapper/%s-rawdst bs=1M count=%d iflag=direct oflag=direct status=none && sync" % (VG, VG, size)))
            sh("lvremove -q -f %s/rawdst" % VG)
            rows["raw_copy"].append(seconds)
            sh("umount %s; lvremove -q -f %s/rcsnap %s/rcopy" % (mount, VG, VG))
            # What any rollback pays before its merge and grows with the amount changed: the
            # umount of the volume, whose kernel frees the page cache of the rewritten files.
            mount = os.path.join(WORK, "restore-umount")
            make_lv("rumount", "1G", mount=mount)
            write_files(mount, size)
            fill_changes(mount, size)
            seconds, _ = timed(lambda: sh("umount %s" % mount))
            rows["umount_alone"].append(seconds)
            sh("lvremove -q -f %s/rumount" % VG)
            log("   %d MiB: guard service back %.2fs, rollback returns %.2fs (merge complete %.2fs), lvconvert --merge %.2fs, copy-back %.2fs, raw copy %.2fs, umount alone %.3fs"
                % (size, rows["guard_service_back"][-1], rows["guard_rollback"][-1], rows["guard_merge_complete"][-1], rows["lvconvert_merge"][-1], rows["copy_back"][-1], rows["raw_copy"][-1], rows["umount_alone"][-1]))
        entry = {key: summary(value) for key, value in rows.items()}
        entry["ratio_vs_lvconvert"] = ratio(entry["guard_service_back"]["median"], entry["lvconvert_merge"]["median"])
        entry["ratio_vs_copy_back"] = ratio(entry["guard_service_back"]["median"], entry["copy_back"]["median"])
        entry["command_ratio_vs_lvconvert"] = ratio(entry["guard_rollback"]["median"], entry["lvconvert_merge"]["median"])
        entry["command_ratio_vs_copy_back"] = ratio(entry["guard_rollback"]["median"], entry["copy_back"]["median"])
        entry["merge_vs_raw_copy"] = ratio(entry["guard_merge_complete"]["median"], entry["raw_copy"]["median"])
        out["%dMiB" % size] = entry
    results["restore_seconds"] = out
    results["restore_goal"] = "guard's time flat in the amount changed, and at least 10x faster than the others at 256 MiB"


# ------------------------------------------------------------------ 3. overhead of a whole empty transaction
def bench_overhead():
    log("3. an empty transaction: guard run vs lvcreate -s + lvremove -f")
    device = make_lv("overhead", "1G", filesystem=False)
    make_lv("overheadlvm", "1G", filesystem=False)
    path = recipe("overhead", device, None)
    guard_times, lvm_times = [], []
    for _ in range(TRIALS):
        seconds, _ = timed(lambda: guard("run", path))
        guard_times.append(seconds)
        seconds, _ = timed(lambda: sh("lvcreate -q -s -L 256M -n ovsnap %s/overheadlvm && lvremove -q -f %s/ovsnap" % (VG, VG)))
        lvm_times.append(seconds)
    results["empty_transaction_seconds"] = {
        "guard_run": summary(guard_times), "lvcreate_lvremove": summary(lvm_times),
        "ratio_median": ratio(statistics.median(guard_times), statistics.median(lvm_times)), "goal": "guard faster (ratio < 1)"}
    log("   guard run %.2fs, lvcreate -s + lvremove %.2fs" % (statistics.median(guard_times), statistics.median(lvm_times)))
    sh("lvremove -q -f %s/overhead %s/overheadlvm" % (VG, VG))


# ------------------------------------------------------------------ 4. write cost with a live snapshot
WRITER = r'''
import mmap, os, random, sys, time
path, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# sequential and random: O_DIRECT 4 KiB writes; fsync: buffered 4 KiB writes at random places,
# each followed by fdatasync, as a database commits its pages.
fd = os.open(path, os.O_WRONLY | (0 if mode == "fsync" else os.O_DIRECT))
buffer = mmap.mmap(-1, 4096)
buffer.write(os.urandom(4096))
blocks = (256 << 20) // 4096
start = time.monotonic()
for i in range(count):
    offset = (i if mode == "sequential" else random.randrange(blocks)) * 4096
    os.pwritev(fd, [buffer], offset)
    if mode == "fsync":
        os.fdatasync(fd)
print(time.monotonic() - start)
'''


def bench_chunks():
    log("4. write cost while a snapshot is live, by chunk size")
    writer = os.path.join(WORK, "writer.py")
    open(writer, "w").write(WRITER)
    count = 2000 if QUICK else 8000
    out = {}
    for mode in ["sequential", "random"]:
        row = {}
        for chunk in [None, "4K", "16K", "64K"]:
            device = make_lv("chunks", "512M", filesystem=False)
            label = "no snapshot"
            if chunk:
                label = chunk
                path = recipe("chunks", device, None, steps="  - name: write\n    run: [python3, %s, %s, '%d', %s]\n" % (writer, device, count, mode), size="300M", chunk=chunk)
                seconds, _ = timed(lambda: guard("run", path))
                show = json.loads(guard("show", "--json", str(json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]["id"])).stdout)
                step = [s for s in show["steps"] if s["kind"] == "step"][0]
                elapsed = float(step["stdout_tail"].strip())
            else:
                elapsed = float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip())
            row[label] = {"seconds": elapsed, "writes_per_second": count / elapsed}
            sh("lvremove -q -f %s/chunks" % VG)
        baseline = row["no snapshot"]["seconds"]
        for label in row:
            row[label]["cost_vs_no_snapshot"] = row[label]["seconds"] / baseline
        out[mode] = row
        log("   %s 4K writes: %s" % (mode, ", ".join("%s %.0f/s" % (k, v["writes_per_second"]) for k, v in row.items())))
    results["write_cost"] = {"writes": count, "by_mode": out}


def guard_step_seconds(path):
    """Runs a recipe whose one step prints its own elapsed seconds; returns them."""
    guard("run", path)
    show = json.loads(guard("show", "--json", str(json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]["id"])).stdout)
    step = [s for s in show["steps"] if s["kind"] == "step"][0]
    return float(step["stdout_tail"].strip())


def bench_write_vs_lvm2():
    """Issue 41: the cost an upgrade pays while it runs under a live snapshot, against lvm2's
    snapshot at the same chunk size (4 KiB): guard's COW where it is by default (a file in the
    state directory, on its ext4 disk), lvm2's an LV of the volume group (the same kind of
    disk image). Each mode on fresh LVs; the median of the trials."""
    log("4b. writes under a live snapshot: guard against lvm2, 4 KiB chunks")
    writer = os.path.join(WORK, "writer.py")
    open(writer, "w").write(WRITER)
    count = 1500 if QUICK else 4000
    trials = 1 if QUICK else max(1, min(TRIALS, 3))
    out = {}
    for mode in ["sequential", "random", "fsync"]:
        rows = {"none": [], "guard": [], "guard_cow_device": [], "guard_cow_loop": [], "lvm2": []}
        for _ in range(trials):
            device = make_lv("wcn", "512M", filesystem=False)
            rows["none"].append(float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip()))
            sh("lvremove -q -f %s/wcn" % VG)
            device = make_lv("wcg", "512M", filesystem=False)
            path = recipe("wcg", device, None, steps="  - name: write\n    run: [python3, %s, %s, '%d', %s]\n" % (writer, device, count, mode), size="300M", chunk="4K")
            rows["guard"].append(guard_step_seconds(path))
            sh("lvremove -q -f %s/wcg" % VG)
            # guard with its COW on a block device (`cow:` an LV of the same disk), as lvm2's is.
            device = make_lv("wcd", "512M", filesystem=False)
            cow = make_lv("wcdcow", "320M", filesystem=False)
            path = recipe("wcd", device, None, steps="  - name: write\n    run: [python3, %s, %s, '%d', %s]\n" % (writer, device, count, mode), size="300M", chunk="4K, cow: %s" % cow)
            rows["guard_cow_device"].append(guard_step_seconds(path))
            sh("lvremove -q -f %s/wcd %s/wcdcow" % (VG, VG))
            # The floor of a COW behind a loop device (as guard's COW file is): `cow:` a loop
            # device with direct I/O over an LV, no filesystem under it.
            device = make_lv("wcf", "512M", filesystem=False)
            cow = make_lv("wcfcow", "320M", filesystem=False)
            loop = sh("losetup -f --show --direct-io=on %s" % cow).strip()
            path = recipe("wcf", device, None, steps="  - name: write\n    run: [python3, %s, %s, '%d', %s]\n" % (writer, device, count, mode), size="300M", chunk="4K, cow: %s" % loop)
            rows["guard_cow_loop"].append(guard_step_seconds(path))
            sh("losetup -d %s" % loop)
            sh("lvremove -q -f %s/wcf %s/wcfcow" % (VG, VG))
            device = make_lv("wcl", "512M", filesystem=False)
            sh("lvcreate -q -y -s -L 300M --chunksize 4K -n wclsnap %s/wcl" % VG)
            rows["lvm2"].append(float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip()))
            sh("lvremove -q -f %s/wclsnap %s/wcl" % (VG, VG))
        row = {name: {"seconds": summary(values), "writes_per_second": count / statistics.median(values)} for name, values in rows.items()}
        row["ratio_guard_over_lvm2"] = row["guard"]["writes_per_second"] / row["lvm2"]["writes_per_second"]
        out[mode] = row
        row["ratio_guard_cow_device_over_lvm2"] = row["guard_cow_device"]["writes_per_second"] / row["lvm2"]["writes_per_second"]
        row["ratio_guard_cow_loop_over_lvm2"] = row["guard_cow_loop"]["writes_per_second"] / row["lvm2"]["writes_per_second"]
        log("   %s: none %.0f/s, guard %.0f/s (cow: a device %.0f/s, a loop device %.0f/s), lvm2 %.0f/s: guard/lvm2 %.2fx (cow: a device %.2fx, a loop device %.2fx)" % (
            mode, row["none"]["writes_per_second"], row["guard"]["writes_per_second"], row["guard_cow_device"]["writes_per_second"],
            row["guard_cow_loop"]["writes_per_second"], row["lvm2"]["writes_per_second"], row["ratio_guard_over_lvm2"],
            row["ratio_guard_cow_device_over_lvm2"], row["ratio_guard_cow_loop_over_lvm2"]))
    results["write_vs_lvm2"] = {
        "writes": count, "trials": trials, "by_mode": out,
        "seq_ratio": out["sequential"]["ratio_guard_over_lvm2"], "random_ratio": out["random"]["ratio_guard_over_lvm2"],
        "fsync_ratio": out["fsync"]["ratio_guard_over_lvm2"],
        # The same through a loop device with no filesystem under it: what a COW behind a
        # loop device can reach at best (the floor of the COW-file design).
        "loop_floor": {mode: out[mode]["ratio_guard_cow_loop_over_lvm2"] for mode in out},
    }


# ------------------------------------------------------------------ 6. peak memory of guard run
def bench_memory():
    log("6. peak memory of guard run")
    device = make_lv("memory", "1G", filesystem=False)
    path = recipe("memory", device, None, steps="  - name: write\n    shell: dd if=/dev/urandom of=%s bs=1M count=64 oflag=direct conv=notrunc status=none\n" % device)
    run = subprocess.run(["/usr/bin/time", "-v", GUARD, "run", path, "--state-dir", STATE], text=True, capture_output=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    results["guard_run_peak_rss_mib"] = int(match.group(1)) / 1024 if match else None
    log("   guard run: %.1f MiB" % (results["guard_run_peak_rss_mib"] or -1))
    sh("lvremove -q -f %s/memory" % VG)


# ------------------------------------------------------------------ 7. the fuse's margin
class RateWriter(threading.Thread):
    """A service guard cannot stop: 1 MiB direct writes to new places on a raw volume at a set
    rate (None: as fast as it can), going on whatever they return, until told to stop."""

    def __init__(self, device, rate_mib):
        super().__init__(daemon=True)
        self.device, self.rate, self.running, self.written, self.refused = device, rate_mib, True, 0, 0
        self.go = threading.Event()

    def run(self):
        import mmap
        block = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
        block.write(os.urandom(1 << 20))
        fd = os.open(self.device, os.O_WRONLY | os.O_DIRECT)
        self.go.wait()
        start, offset = time.monotonic(), 0
        while self.running:
            try:
                os.pwrite(fd, block, offset)
                self.written += 1
            except OSError:
                self.refused += 1
            offset = (offset + (1 << 20)) % (900 << 20)
            if self.rate:
                ahead = (self.written + self.refused) / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        os.close(fd)


def bench_fuse():
    log("7. the fuse's margin: how fast a writer guard cannot stop may be, and the rollback survives")
    rates = [8, 32, 128, None] if QUICK else [8, 16, 32, 64, 128, 256, None]
    rows = []
    for rate in rates:
        device = make_lv("fuse", "1G", filesystem=False)
        stop = os.path.join(WORK, "fuse-stop")
        if os.path.exists(stop):
            os.remove(stop)
        writer = RateWriter(device, rate)
        writer.start()
        # The writer starts with the run's resume hook (after the snapshot instant) and is
        # stopped only by the rollback's stop hook, like a service.
        go = os.path.join(WORK, "fuse-go")
        if os.path.exists(go):
            os.remove(go)
        threading.Thread(target=lambda: (wait_for(go), writer.go.set()), daemon=True).start()
        path = recipe("fuse", device, None, size="8M",
                      steps="  - name: a migration the writer outruns\n    run: [sleep, '600']\n")
        with open(path, "a") as f:
            f.write("resume:\n  - name: the service writes\n    run: [touch, %s]\nrollback:\n  stop:\n    - name: stop the service\n      run: [touch, %s]\n" % (go, stop))
        threading.Thread(target=lambda: (wait_for(stop), setattr(writer, "running", False)), daemon=True).start()
        elapsed, run = timed(lambda: guard("run", path, check=False))
        writer.running = False
        writer.go.set()
        writer.join()
        last = json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]
        kept = last["outcome"] == "rolled_back"
        rows.append({"rate_mib_s": rate, "outcome": last["outcome"], "snapshot_valid": kept, "written_mib": writer.written,
                     "refused_writes": writer.refused, "seconds": elapsed})
        log("   writer at %s: %s (%d MiB written, %d writes refused)" % ("%d MiB/s" % rate if rate else "full speed", last["outcome"], writer.written, writer.refused))
        sh("lvremove -q -f %s/fuse" % VG)
    stopped = [row["rate_mib_s"] for row in rows if row["snapshot_valid"]]
    results["fuse"] = {
        "size": "8M", "reserve": "32M", "stop_at": "90%", "rows": rows,
        "fastest_rate_stopped_mib_s": "full speed" if any(row["rate_mib_s"] is None and row["snapshot_valid"] for row in rows)
        else (max(r for r in stopped if r) if [r for r in stopped if r] else None),
        "lvm2": "an lvcreate -s -L 8M snapshot has no fuse: any writer that changes more than 8 MiB invalidates it",
    }


# ------------------------------------------------------------------ 8. thin guard volumes
def make_thin(name, size_mib, pool_mib, mount=None):
    """A thin guard volume over an LV of the same disk (a blank one: guard refuses a backing
    that holds anything, and lvcreate zeroes only its first 4 KiB)."""
    backing = make_lv(name + "b", "%dM" % (pool_mib + 64), filesystem=False)
    sh("dd if=/dev/zero of=%s bs=1M count=16 oflag=direct status=none" % backing)
    guard("volume", "create", name, "--backing", backing, "--size", "%dM" % size_mib, "--thin", "--pool-size", "%dM" % pool_mib)
    device = "/dev/mapper/%s" % name
    if mount:
        sh("mkfs.ext4 -q -F %s" % device)
        os.makedirs(mount, exist_ok=True)
        sh("mount %s %s" % (device, mount))
    return device


def drop_thin(name, mount=None):
    if mount:
        sh("umount %s" % mount, check=False)
    guard("volume", "remove", name)
    sh("lvremove -q -f %s/%sb" % (VG, name))


def last_run():
    return json.loads(guard("history", "--json", "--limit", "1").stdout)["runs"][0]["id"]


def bench_thin():
    log("8. thin guard volumes: rollback by swapping ids, against the classic snapshot and lvconvert --merge; write cost")
    sizes = [16, 64] if QUICK else [16, 64, 256, 1024]
    trials = 1 if QUICK else max(TRIALS - 2, 2)
    out = {}
    for size in sizes:
        rows = {"thin_service_back": [], "thin_rollback": [], "classic_service_back": [], "classic_merge_complete": [], "lvconvert_merge": []}
        volume_mib = max(1024, size + 256)
        for trial in range(trials):
            # thin: a kept run of the bad upgrade, rolled back.
            mount = os.path.join(WORK, "thin-restore")
            # The pool holds the files and the upgrade's copy of them below stop_at (90%).
            make_thin("tr", volume_mib, max(volume_mib, int(2.5 * size) + 128) + 64, mount=mount)
            write_files(mount, size)
            seconds, rollback = guard_kept_rollback("thin-restore", "/dev/mapper/tr", mount, size, "16M")
            rows["thin_rollback"].append(seconds)
            rows["thin_service_back"].append(service_back(rollback))
            drop_thin("tr", mount)

            # classic: the same on an LV, guard's COW and merge.
            mount = os.path.join(WORK, "classic-restore")
            device = make_lv("cr", "%dM" % volume_mib, mount=mount)
            write_files(mount, size)
            seconds, rollback = guard_kept_rollback("classic-restore", device, mount, size, "%dM" % (size * 2 + 32))
            waited, _ = timed(lambda: guard("status", "--wait"))
            rows["classic_merge_complete"].append(seconds + waited)
            rows["classic_service_back"].append(service_back(rollback))
            sh("umount %s; lvremove -q -f %s/cr" % (mount, VG))

            rows["lvconvert_merge"].append(lvconvert_merge("lr", volume_mib, size))
            log("   %d MiB: thin service back %.2fs (rollback returns %.2fs), classic service back %.2fs (merge complete %.2fs), lvconvert --merge %.2fs"
                % (size, rows["thin_service_back"][-1], rows["thin_rollback"][-1], rows["classic_service_back"][-1], rows["classic_merge_complete"][-1], rows["lvconvert_merge"][-1]))
        entry = {key: summary(value) for key, value in rows.items()}
        entry["lvconvert_vs_thin"] = ratio(entry["lvconvert_merge"]["median"], entry["thin_service_back"]["median"])
        entry["classic_merge_vs_thin"] = ratio(entry["classic_merge_complete"]["median"], entry["thin_service_back"]["median"])
        out["%dMiB" % size] = entry

    # Write cost: 4 KiB direct writes to a 512 MiB volume whose blocks are all written once
    # before (so no run measures the pool's first allocation), with no snapshot, a live thin
    # snapshot, and 1, 2 and 4 kept generations; classic: guard's 4K/64K COW, lvm2 snapshots.
    writer = os.path.join(WORK, "writer.py")
    open(writer, "w").write(WRITER)
    count = 2000 if QUICK else 8000
    write = {}
    for mode in ["random", "sequential"]:
        row = {}
        device = make_thin("tw", 512, 1536)
        sh("dd if=/dev/urandom of=%s bs=1M count=512 oflag=direct status=none" % device)
        row["thin, no snapshot"] = float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip())
        for generations in [1, 2, 4]:
            while len(json.loads(guard("status", "--json").stdout)["runs"]) < generations:
                guard("run", recipe("thin-gen", device, None, size="16M", on_success="keep"))
            row["thin, %d kept" % generations] = float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip())
            # Each measurement writes: the next generation starts from blocks it has not shared yet.
        for run in json.loads(guard("status", "--json").stdout)["runs"]:
            guard("commit", str(run["id"]))
        drop_thin("tw")
        device = make_lv("cw", "512M", filesystem=False)
        sh("dd if=/dev/urandom of=%s bs=1M count=512 oflag=direct status=none" % device)
        row["classic, no snapshot"] = float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip())
        for chunk in ["4K", "64K"]:
            path = recipe("classic-write", device, None, steps="  - name: write\n    run: [python3, %s, %s, '%d', %s]\n" % (writer, device, count, mode), size="300M", chunk=chunk)
            guard("run", path)
            step = [s for s in json.loads(guard("show", "--json", str(last_run())).stdout)["steps"] if s["kind"] == "step"][0]
            row["classic guard %s chunks, 1 snapshot" % chunk] = float(step["stdout_tail"].strip())
        for generations in [1, 2, 4]:
            while int(sh("lvs --noheadings -o lv_name %s | grep -c cwsnap || true" % VG).strip() or 0) < generations:
                index = int(sh("lvs --noheadings -o lv_name %s | grep -c cwsnap || true" % VG).strip() or 0)
                sh("lvcreate -q -s -L 300M -n cwsnap%d %s/cw" % (index, VG))
            row["lvm2 classic 4K chunks, %d snapshot%s" % (generations, "s" if generations > 1 else "")] = float(sh("python3 %s %s %d %s" % (writer, device, count, mode)).strip())
        sh("lvremove -q -f %s/cw $(lvs --noheadings -o lv_name %s | grep cwsnap | sed 's|^ *|%s/|')" % (VG, VG, VG))
        write[mode] = {label: {"seconds": seconds, "writes_per_second": count / seconds} for label, seconds in row.items()}
        log("   %s 4K writes: %s" % (mode, ", ".join("%s %.0f/s" % (k, count / v) for k, v in row.items())))
    results["thin"] = {"trials": trials, "restore_seconds": out, "write_cost": {"writes": count, "by_mode": write},
                       "goal": "thin rollback flat in the amount changed, and at least 50x faster than lvconvert --merge at 1 GiB"}


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)


def main():
    loop, state_loop = setup()
    try:
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
        for bench in [bench_stall, bench_overhead, bench_restore, bench_chunks, bench_write_vs_lvm2, bench_memory, bench_fuse, bench_thin]:
            if only and bench.__name__.replace("bench_", "") not in only:
                continue
            bench()
            json.dump(results, open(OUTPUT, "w"), indent=2, sort_keys=True)
    finally:
        sh("vgremove -q -f %s; pvremove -q %s; losetup -d %s" % (VG, loop, loop), check=False)
        sh("umount %s; losetup -d %s" % (STATE, state_loop), check=False)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json.dump(results, open(OUTPUT, "w"), indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
