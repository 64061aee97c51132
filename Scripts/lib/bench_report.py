#!/usr/bin/env python3
"""Writes Docs/benchmarks.md and .json from the benchmark results.

    bench_report.py DEVICES.json JOURNAL.json OUT.json OUT.md
"""
import json, sys

devices, journal = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
combined = {"devices": devices, "journal": journal}
json.dump(combined, open(sys.argv[3], "w"), indent=2, sort_keys=True)

def f(value, digits=2):
    return "-" if value is None else ("%.*f" % (digits, value))

def verdict(ok):
    return "met" if ok else "**not met**"

lines = ["# Benchmarks", "",
         "Produced by `Scripts/bench` (machine-readable: `Docs/benchmarks.json`). guard and the "
         "alternatives ran on identical volumes in the same run, on kernel %s, with %d trials per "
         "measurement (median and worst). Under software emulation (the VM on a machine without "
         "device-mapper, as here) absolute times are many times slower than on hardware; the "
         "ratios are what the goals are about. The volumes are LVs of one disk image; guard's state "
         "directory (its journal and COW files, `/var/lib/guard` on a server) is an ext4 filesystem "
         "on a second disk image, as it would be on a disk." % (devices.get("kernel", "?"), devices.get("trials", 0)), ""]

s = devices.get("stall_ms")
if s:
    lines += ["## 1. Service stall while the snapshot is taken", "",
              "A writer does 4 KiB writes with fdatasync to a file on the mounted 1 GiB volume; the longest "
              "single write while the snapshot is taken is its stall.", "",
              "| | median (ms) | worst (ms) |", "| --- | --- | --- |",
              "| `guard run` (whole run: snapshot + commit) | %s | %s |" % (f(s["guard"]["median"], 1), f(s["guard"]["worst"], 1)),
              "| guard's suspend window (journaled `suspend_us`) | %s | %s |" % (f(s["guard_suspend_window"]["median"], 1), f(s["guard_suspend_window"]["worst"], 1)),
              "| of which the suspend: flush and freeze (journaled) | %s | %s |" % (f(s["guard_window_suspend_part"]["median"], 1), f(s["guard_window_suspend_part"]["worst"], 1)),
              "| of which the resumes (journaled) | %s | %s |" % (f(s["guard_window_resume_part"]["median"], 1), f(s["guard_window_resume_part"]["worst"], 1)),
              "| `lvcreate -s -L 256M` | %s | %s |" % (f(s["lvcreate_s"]["median"], 1), f(s["lvcreate_s"]["worst"], 1)),
              "| physical floor: `dmsetup suspend` + `dmsetup resume`, no table change | %s | %s |" % (f(s["dmsetup_suspend_resume"]["median"], 1), f(s["dmsetup_suspend_resume"]["worst"], 1)),
              "| physical floor in one process: libdevmapper suspend + resume | %s | %s |" % (f(s["libdevmapper_suspend_resume"]["median"], 1), f(s["libdevmapper_suspend_resume"]["worst"], 1)),
              "| **ratio guard / lvcreate** | %s | %s |" % (f(s["ratio_median"]), f(s["ratio_worst"])),
              "| ratio guard / dmsetup suspend+resume | %s | |" % f(s["ratio_vs_dmsetup_median"]),
              "| ratio guard / libdevmapper suspend+resume | %s | |" % f(s["ratio_vs_libdevmapper_median"]), "",
              "Goal: guard's stall at most half of lvcreate's, median and worst: %s." % verdict((s["ratio_median"] or 9) <= 0.5 and (s["ratio_worst"] or 9) <= 0.5),
              "Goal: guard's stall within 2x of a bare `dmsetup suspend`/`resume`: %s (%s x; %s x of the same suspend and resume in one process)."
              % (verdict((s["ratio_vs_dmsetup_median"] or 9) <= 2), f(s["ratio_vs_dmsetup_median"]), f(s["ratio_vs_libdevmapper_median"])), ""]

r = devices.get("restore_seconds")
if r:
    lines += ["## 2. Time until the service sees the old data again", "",
              "A bad upgrade rewrote N MiB of files in a 1 GiB ext4 volume. guard: `guard rollback RUN` of the kept run; "
              "its recipe's `rollback.start` hook starts the service again once the volume is mounted with the old data, "
              "and the moment that hook runs is when the service sees the old data again (the hook is one program, `date +%s.%N`, "
              "as a service's start command is; the journal keeps its output). The command returns a little later, "
              "once udev has finished with the devices (the merge goes on underneath). "
              "lvm2: `umount; lvconvert --merge vg/snap` (waits for the merge, as its man page runs it); `mount`. "
              "Copy-back: mount the snapshot, `cp -a` the files back (the tutorial's way). "
              "Each time is from the start of the first command. The last column is the `umount` of a plain volume "
              "after the same bad upgrade, with nothing else: the kernel frees the page cache of the rewritten files in it, "
              "and every rollback (guard's, lvconvert's) unmounts before it merges.", "",
              "| changed | guard: service back (s) | guard rollback returns (s) | lvconvert --merge (s) | copy-back (s) | guard / lvconvert | guard / copy-back | guard merge complete (s) | raw copy of the changes (s) | umount alone (s) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    # The JSON's keys are sorted as text; show the sizes in numeric order.
    r = dict(sorted(r.items(), key=lambda item: int(item[0].rstrip("MiB"))))
    for size, e in r.items():
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (size, f(e["guard_service_back"]["median"]), f(e["guard_rollback"]["median"]), f(e["lvconvert_merge"]["median"]), f(e["copy_back"]["median"]),
                     f(e["ratio_vs_lvconvert"]), f(e["ratio_vs_copy_back"]), f(e["guard_merge_complete"]["median"]), f(e["raw_copy"]["median"]),
                     f(e.get("umount_alone", {}).get("median"), 3)))
    first, last = list(r.values())[0], list(r.values())[-1]
    fast = last["ratio_vs_lvconvert"] is not None and last["ratio_vs_lvconvert"] <= 0.1 and last["ratio_vs_copy_back"] <= 0.1
    spread = last["guard_service_back"]["median"] / first["guard_service_back"]["median"]
    flat = spread <= 1.2
    lines += ["", "Goal: flat in the amount changed, the largest size within 1.2x of the smallest (guard's service back: %s; %s x): %s."
              % (", ".join("%s s at %s" % (f(e["guard_service_back"]["median"]), size) for size, e in r.items()), f(spread), verdict(flat)),
              "Goal: at least 10x faster than both at the largest size (%s x lvconvert, %s x copy-back): %s. "
              "By the time `guard rollback` returns: %s x lvconvert, %s x copy-back."
              % (f(1 / last["ratio_vs_lvconvert"]), f(1 / last["ratio_vs_copy_back"]), verdict(fast),
                 f(1 / last["command_ratio_vs_lvconvert"]), f(1 / last["command_ratio_vs_copy_back"]))]
    if "umount_alone" in first and "umount_alone" in last:
        # The umount's growth is in every rollback's time. With it as the least growth G, flat
        # (t_large <= 1.2 t_small) needs t_large >= 6 G; 10x a copy-back needs t_large <= copy-back / 10.
        growth = last["umount_alone"]["median"] - first["umount_alone"]["median"]
        low, high = 6 * growth, last["copy_back"]["median"] / 10
        lines += ["The two goals together: the umount alone grows by %s s from %s to %s. A rollback pays at least that growth, "
                  "so being flat within 1.2x needs the service back after at least 6 x %s = %s s at %s, and 10x a copy-back "
                  "needs it within %s s: %s."
                  % (f(growth, 3), list(r)[0], list(r)[-1], f(growth, 3), f(low), list(r)[-1], f(high),
                     "no time satisfies both on this machine" if low > high else "both can hold only between %s and %s s" % (f(low), f(high)))]
    lines += [""]

o = devices.get("empty_transaction_seconds")
if o:
    lines += ["## 3. An empty transaction", "",
              "| | median (s) | worst (s) |", "| --- | --- | --- |",
              "| `guard run` of an empty recipe (preflight, snapshot, commit, journal) | %s | %s |" % (f(o["guard_run"]["median"]), f(o["guard_run"]["worst"])),
              "| `lvcreate -s` + `lvremove -f` | %s | %s |" % (f(o["lvcreate_lvremove"]["median"]), f(o["lvcreate_lvremove"]["worst"])),
              "| **ratio** | %s | |" % f(o["ratio_median"]), "", "Goal: guard faster: %s." % verdict((o["ratio_median"] or 9) < 1), ""]

w = devices.get("write_cost")
if w:
    lines += ["## 4. Write cost while a snapshot is live, by chunk size", "",
              "%d O_DIRECT 4 KiB writes to a 512 MiB volume, each block written once (sequential) or at random; "
              "the kernel copies the old chunk on the first write to it." % w["writes"], ""]
    for mode, row in w["by_mode"].items():
        lines += ["| %s | writes/s | time vs no snapshot |" % mode, "| --- | --- | --- |"]
        order = lambda label: -1 if label == "no snapshot" else int(label.rstrip("K"))
        for label, v in sorted(row.items(), key=lambda item: order(item[0])):
            lines.append("| %s | %.0f | %s |" % (label, v["writes_per_second"], f(v["cost_vs_no_snapshot"])))
        lines.append("")

wl = devices.get("write_vs_lvm2")
if wl:
    lines += ["## 4b. Writes under a live snapshot: guard against lvm2 at the same chunk size", "",
              "%d 4 KiB writes to the first 256 MiB of a raw 512 MiB volume under a live snapshot with 4 KiB chunks: "
              "guard's (its COW where it is by default, a file in the state directory on that ext4 disk, and with `cow:` "
              "an LV of the volume group) and lvm2's `lvcreate -s -L 300M --chunksize 4K` (its COW an LV of the same "
              "disk image). Sequential and random are O_DIRECT; fsync is buffered writes at random places, each followed "
              "by fdatasync, as a database commits its pages. Median of %d trial(s)%s." % (
                  wl["writes"], wl["trials"], "; measured by `%s`, separately from the other sections" % wl["command"] if wl.get("command") else ""), "",
              "| writes | no snapshot (writes/s) | guard, COW file (writes/s) | guard, `cow:` an LV (writes/s) | guard, `cow:` a loop device over an LV (writes/s) | lvm2 (writes/s) | **guard / lvm2** | guard `cow:` LV / lvm2 | loop floor / lvm2 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def rate(row, key):
        return "%.0f" % row[key]["writes_per_second"] if key in row else "-"
    for mode, row in wl["by_mode"].items():
        lines.append("| %s | %.0f | %.0f | %s | %s | %.0f | %s | %s | %s |" % (
            mode, row["none"]["writes_per_second"], row["guard"]["writes_per_second"], rate(row, "guard_cow_device"), rate(row, "guard_cow_loop"),
            row["lvm2"]["writes_per_second"], f(row["ratio_guard_over_lvm2"]), f(row.get("ratio_guard_cow_device_over_lvm2")),
            f(row.get("ratio_guard_cow_loop_over_lvm2"))))
    met = all((wl[k] or 0) >= 1.0 for k in ["seq_ratio", "random_ratio", "fsync_ratio"])
    lines += ["", "Goal: guard at least as fast as lvm2 (>= 1.0x), sequential, random and fsync: %s (%s, %s, %s)." % (
        verdict(met), f(wl["seq_ratio"]), f(wl["random_ratio"]), f(wl["fsync_ratio"])), ""]
    if wl.get("loop_floor"):
        lines += ["The loop floor is guard with `cow:` a loop device (direct I/O) over an LV: the loop driver with no "
                  "filesystem under it, the best a COW behind a loop device (guard's COW file) can do. The rest of the "
                  "COW file's cost is its filesystem's: the loop device turns each exception-store commit into an fsync "
                  "of the file, which commits ext4's journal. Guard at or "
                  "above lvm2 with its COW on the state filesystem needs a COW that is not behind a loop device.", ""]

j = journal
if j:
    lines += ["## 5. `guard history` and `guard show` on a journal of %d runs" % j["runs"], "",
              "Journal: %.0f MiB. Whole process, start to exit." % (j["journal_bytes"] / 1048576), "",
              "| command | median (ms) | worst (ms) | peak RSS (MiB) |", "| --- | --- | --- | --- |"]
    for key, label in [("history", "guard history"), ("history_json", "guard history --json"), ("show", "guard show RUN"), ("show_json", "guard show --json RUN")]:
        lines.append("| `%s` | %.0f | %.0f | %.1f |" % (label, j[key]["ms"]["median"], j[key]["ms"]["worst"], j[key]["peak_rss_mib"]["worst"]))
    worst_ms = max(j[k]["ms"]["median"] for k in ["history", "history_json", "show", "show_json"])
    worst_rss = max(j[k]["peak_rss_mib"]["worst"] for k in ["history", "history_json", "show", "show_json"])
    lines += ["", "Goal: under 200 ms and 50 MiB: %s (slowest median %.0f ms, largest RSS %.1f MiB)." % (verdict(worst_ms < 200 and worst_rss < 50), worst_ms, worst_rss), ""]

m = devices.get("guard_run_peak_rss_mib")
if m is not None:
    lines += ["## 6. Peak memory of `guard run`", "",
              "A run writing 64 MiB: %.1f MiB resident at its peak (GNU time's maximum over guard and the processes it waits "
              "for). guard and its suspend watchdog lock their memory (mlockall) only where a page of them could have "
              "to be read from a volume they suspend (their program, libraries or swap on it): never in this benchmark. "
              "The watchdog is `guard-watchdog`, a program of its own without Foundation, so what it locks when it must is "
              "that program, not guard's." % m, "",
              "Goal: at most 40 MiB: %s." % verdict(m <= 40), ""]

fz = devices.get("fuse")
if fz:
    lines += ["## 7. The fuse's margin", "",
              "A writer guard did not start and cannot stop (1 MiB direct writes to new places of a raw 1 GiB volume at a set rate, "
              "started by the run's resume hook and stopped only by its rollback's stop hook) runs against a %s snapshot (stop_at %s, "
              "fuse reserve %s) during a step that never ends. guard stops the step at stop_at, blows the fuse (the volume refuses "
              "writes) and rolls back; the snapshot must stay valid. lvm2 has no fuse: %s." % (fz["size"], fz["stop_at"], fz["reserve"], fz["lvm2"]), "",
              "| writer | outcome | snapshot valid | written (MiB) | writes refused by the fuse |", "| --- | --- | --- | --- | --- |"]
    for row in fz["rows"]:
        lines.append("| %s | %s | %s | %d | %d |" % ("%d MiB/s" % row["rate_mib_s"] if row["rate_mib_s"] else "full speed", row["outcome"],
                     "yes" if row["snapshot_valid"] else "**no**", row["written_mib"], row["refused_writes"]))
    lines += ["", "Fastest writer stopped in time: %s." % (("%s MiB/s" % fz["fastest_rate_stopped_mib_s"]) if isinstance(fz["fastest_rate_stopped_mib_s"], int) else (fz["fastest_rate_stopped_mib_s"] or "none")), ""]

t = devices.get("thin")
if t:
    lines += ["## 8. Thin guard volumes: a rollback is a swap of thin ids", "",
              "The same bad upgrade as in section 2 on a thin guard volume (`guard volume create --thin`, its pool over an LV "
              "of the same disk), rolled back by `guard rollback RUN`: the volume's table goes to the snapshot's thin id and the "
              "replaced id is deleted, with no merge. Beside it, on an LV of the same size: guard's classic snapshot (service back, "
              "and the merge complete) and lvm2's `umount; lvconvert --merge; mount`. %d trials per size." % t["trials"], "",
              "| changed | thin: service back (s) | thin: rollback returns (s) | classic: service back (s) | classic: merge complete (s) | lvconvert --merge (s) | lvconvert / thin | classic merge / thin |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    sizes = sorted(t["restore_seconds"], key=lambda k: int(k.replace("MiB", "")))
    for size in sizes:
        e = t["restore_seconds"][size]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            size, f(e["thin_service_back"]["median"]), f(e["thin_rollback"]["median"]), f(e["classic_service_back"]["median"]),
            f(e["classic_merge_complete"]["median"]), f(e["lvconvert_merge"]["median"]), f(e["lvconvert_vs_thin"], 1), f(e["classic_merge_vs_thin"], 1)))
    first, last = t["restore_seconds"][sizes[0]], t["restore_seconds"][sizes[-1]]
    flat = last["thin_service_back"]["median"] / first["thin_service_back"]["median"]
    lines += ["", "Goal: flat in the amount changed (thin's service back %s s at %s, %s s at %s: %s x): %s." % (
        f(first["thin_service_back"]["median"]), sizes[0], f(last["thin_service_back"]["median"]), sizes[-1], f(flat), verdict(flat <= 1.2)),
        "Goal: at least 50x faster than lvconvert --merge at 1 GiB (%s x at %s): %s." % (
        f(last["lvconvert_vs_thin"], 1), sizes[-1], verdict(sizes[-1] == "1024MiB" and (last["lvconvert_vs_thin"] or 0) >= 50)), ""]
    w = t["write_cost"]
    lines += ["**Write cost**: %d O_DIRECT 4 KiB writes to a 512 MiB volume whose blocks were all written once before "
              "(so no row pays the pool's first allocation). dm-thin shares 64 KiB blocks: the first write to a shared block "
              "copies it, once, however many snapshots share it; lvm2's classic snapshots each copy." % w["writes"], ""]
    for mode in ["random", "sequential"]:
        row = w["by_mode"].get(mode)
        if not row:
            continue
        lines += ["| %s | writes/s | time vs its volume with no snapshot |" % mode, "| --- | --- | --- |"]
        for label, value in row.items():
            base = row["thin, no snapshot"]["seconds"] if label.startswith("thin") else row["classic, no snapshot"]["seconds"]
            lines.append("| %s | %.0f | %s |" % (label, value["writes_per_second"], f(value["seconds"] / base)))
        lines.append("")

open(sys.argv[4], "w").write("\n".join(lines))

# What limits guard where a goal is not met, from this run's own rows.
floor = (s or {}).get("libdevmapper_suspend_resume", {}).get("median")
suspend_part = (s or {}).get("guard_window_suspend_part", {}).get("median")
lvcreate = (s or {}).get("lvcreate_s", {}).get("median")
with open(sys.argv[4], "a") as out:
    out.write("""
## What limits guard here

**The stall.** guard's window is the suspend of the origin (the kernel flushes it and
freezes its filesystem, which makes ext4 write back its journal) followed by the resumes
of `-snap` and the origin. The suspend is kernel work every tool that freezes pays: in this
run guard's suspend part took %s ms (median), and a bare suspend and resume of the same
volume with no table change, in one process through libdevmapper, stalled the writer
%s ms, that is %s x `lvcreate -s`'s stall. Half of lvcreate's stall is therefore below the
kernel's own floor here, and no tool that freezes the filesystem can reach it; what guard
controls is the rest of the window, which it has cut: `-real` is live before the suspend,
no udev cookie is made inside the window, and the commit no longer freezes the filesystem
a second time. `dmsetup suspend` + `dmsetup resume`, the floor an admin has by hand,
stalls longer than guard because the second command starts while the volume is suspended.

**Fixed costs.** Every guard command starts a 100 MB Swift binary (0.2-0.5 s under this
emulation, `guard --version`; a fifth of that on the host is the Swift runtime's search of
its protocol conformances, the rest is the kernel mapping the program); the commands that
suspend a volume also start `guard-watchdog`, and write the journal (SQLite, one fsync per
group of records) and the COW labels on a real filesystem. The journal's own timestamps
(`guard show --json RUN`: the rollback phase, its events and the start hook's step) split a
rollback of 16 MiB under this emulation (three rollbacks, from the command's start): 0.72-0.83 s
before the rollback begins (starting, reading the run, locking and attaching the devices,
starting the watchdog; 0.77-1.01 s before opening the journal stopped writing), 0.07-0.17 s
unmounting, 0.29-0.35 s starting the merge and mounting again, and 0.16-0.17 s from the
start hook's launch to its program running (0.22-0.31 s when every step and hook started
through a shell that moved itself into the step's cgroup; guard now creates the process
inside the cgroup, clone3 CLONE_INTO_CGROUP: four rollbacks of each binary, alternating).
These costs are constant and keep guard short of 10x against a copy-back at 256 MiB; so does
this emulation's noise, which is as large as what is left (two trials per size: 1.76 and
2.02 s at 256 MiB in this run, 1.29 and 1.54 s in the run before it). What grew with the amount changed was udev: once the
merge starts it probes the origin, whose reads compete with the merge's copying (0.6 s at
16 MiB, 1.3 s at 256 MiB). guard waits for udev after the volume is mounted again and the
start hooks have run, so the service does not wait for it; the command still does, before
it returns.

**Write cost.** guard's COW is by default a file in its state directory, attached to a
loop device: each first write to a chunk is copied into that file, and each commit of the
kernel's exception store (a metadata chunk written with FUA/flush once the copies of a
batch are done) becomes a flush of the loop device, that is an fsync of the file, that is
an ext4 journal commit on the state disk. lvm2's COW is an LV: the same flush is one cache
flush of the disk. Where the time went, in the order it was found (section 4b, one VM run
each): the loop device without direct I/O (guard/lvm2 0.19x sequential, 0.17x random, 0.23x
fsync); with direct I/O 0.21x, 0.20x, 0.25x (the page cache was not the cost); the file's
blocks preallocated but unwritten, so every first write converted an extent in ext4's
journal: guard now writes the whole file with zeros when it is created (before the
upgrade's services are stopped, as the run's plan and journal record) and attaches it with
direct I/O, 0.30x, 0.39x, 0.39x. What is left is the fsync per exception commit, one ext4
journal commit each, which a file cannot avoid; a COW on a block device (`cow:` in the
recipe, an LV or a partition) removes the file system in between (its column in 4b). The
default chunk size is unchanged: section 4 shows 4 KiB is not the cost.
""" % (f(suspend_part, 1), f(floor, 1), f(floor / lvcreate if floor and lvcreate else None)))
