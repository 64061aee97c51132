#!/usr/bin/env python3
"""Benchmark 5: `guard history` and `guard show` on a journal of 100,000 runs (host only: they
never need the kernel). The journal is written with the schema of Sources/Journal/Schema.swift.

    journal_bench.py GUARD_BINARY OUTPUT.json [--runs N] [--trials N]
"""
import json, os, re, sqlite3, statistics, subprocess, sys, tempfile, time

GUARD, OUTPUT = sys.argv[1], sys.argv[2]
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 100_000
TRIALS = int(sys.argv[sys.argv.index("--trials") + 1]) if "--trials" in sys.argv else 7
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

source = open(os.path.join(ROOT, "Sources/Journal/Schema.swift")).read()
# Every migration, in order: its name, and its SQL (plain DDL, or the closed sets of v3 made
# into the same triggers Schema.swift makes).
def closed_set_triggers(body):
    sql = []
    # v3's list of sets, and a single closedSet(db, table:, column:, values:, nullable:) call (v4).
    sets = re.findall(r'\("(\w+)", "(\w+)", \[([^\]]*)\], (true|false)\)', body)
    sets += re.findall(r'closedSet\(\s*db, table: "(\w+)", column: "(\w+)", values: \[([^\]]*)\],\s*nullable: (true|false)\)', body)
    # v4 first drops the triggers it makes again.
    for names in re.findall(r'for name in \[([^\]]*)\] \{ try db.execute\(sql: "DROP TRIGGER IF EXISTS (\w+)_\\\(name\)"\) \}', body):
        for name in re.findall(r'"([^"]+)"', names[0]):
            sql.append("DROP TRIGGER IF EXISTS %s_%s;" % (names[1], name))
    for table, column, values, nullable in sets:
        names = re.findall(r'"([^"]+)"', values)
        listed = ", ".join("'%s'" % v for v in names)
        outside = "NEW.%s NOT IN (%s)" % (column, listed) + (" AND NEW.%s IS NOT NULL" % column if nullable == "true" else "")
        message = "%s.%s must be one of %s%s" % (table, column, ", ".join(names), " or NULL" if nullable == "true" else "")
        for event, name in [("INSERT", "insert"), ("UPDATE OF %s" % column, "update")]:
            sql.append("CREATE TRIGGER %s_%s_%s BEFORE %s ON %s WHEN %s BEGIN SELECT RAISE(ABORT, '%s'); END;" % (table, column, name, event, table, outside, message))
    return "\n".join(sql)

migrations = []
for name, body in re.findall(r'registerMigration\("([^"]+)"\) \{ db in\n(.*?)\n        \}\n', source, re.S):
    literal = re.search(r'sql: """\n(.*?)"""', body, re.S)
    migrations.append((name, closed_set_triggers(body) if "closedSet(" in body else literal.group(1)))

state = tempfile.mkdtemp(prefix="guard-journal-bench-")
db = sqlite3.connect(os.path.join(state, "journal.sqlite"))
db.execute("CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY)")
for name, ddl in migrations:
    db.executescript(ddl)
    db.execute("INSERT INTO grdb_migrations VALUES (?)", (name,))
recipe = "name: website-schema-v2\n" + "# padding\n" * 40
start = 1_700_000_000.0
for i in range(RUNS):
    run_id = i + 1
    started = start + i * 600
    outcome = ["committed", "rolled_back", "kept", "committed", "failed"][i % 5]
    db.execute("INSERT INTO runs (id, token, recipe_name, recipe_path, recipe_sha256, recipe_text, host, user, pid, started_at, finished_at, phase, state, decision, outcome, exit_code, suspend_us) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (run_id, "%08x" % run_id, "recipe-%d" % (i % 20), "/etc/guard/r.recipe", "ab" * 32, recipe, "web1", "root", 1000, started, started + 42, "done", "finished", "commit", outcome, 0, 900))
    for phase in ["preflight", "snapshot", "steps", "verify", "commit", "done"]:
        db.execute("INSERT INTO phases (run_id, name, started_at, finished_at, status) VALUES (?,?,?,?, 'done')", (run_id, phase, started, started + 1))
    db.execute("INSERT INTO steps (run_id, kind, position, name, argv, started_at, duration, termination, exit_code, stdout_tail, stderr_tail, output_bytes) VALUES (?, 'step', 0, 'migrate', '[\"/bin/sh\",\"-c\",\"migrate\"]', ?, 3.2, 'exit 0', 0, ?, '', 4096)", (run_id, started, "ok\n" * 100))
    db.execute("INSERT INTO snapshots (run_id, volume_index, volume, mount_point, origin_name, origin_uuid, origin_device, origin_table, origin_bytes, cow_path, cow_kind, size_bytes, chunk_bytes, peak_used_bytes, state, stack) VALUES (?, 0, '/dev/mapper/vg-web', '/srv/web', 'vg-web', 'LVM-x', '254:0', '0 2097152 linear 7:0 2048', 1073741824, '/var/lib/guard/cow/x.cow', 'file', 268435456, 4096, 1048576, 'committed', '{}')", (run_id,))
    snapshot_id = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    db.executemany("INSERT INTO cow_samples (snapshot_id, at, used_bytes, size_bytes) VALUES (?,?,?,?)", [(snapshot_id, t * 2.0, t * 65536, 268435456) for t in range(10)])
db.commit()
db.close()
size = os.path.getsize(os.path.join(state, "journal.sqlite"))

def measure(args):
    times, rss = [], []
    for _ in range(TRIALS):
        begin = time.monotonic()
        run = subprocess.run(["/usr/bin/time", "-v", GUARD, *args, "--state-dir", state], capture_output=True, text=True)
        times.append((time.monotonic() - begin) * 1000)
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        rss.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) / 1024)
    return {"ms": {"median": statistics.median(times), "worst": max(times), "samples": times},
            "peak_rss_mib": {"median": statistics.median(rss), "worst": max(rss)}}

results = {"runs": RUNS, "journal_bytes": size, "goal": "under 200 ms and 50 MiB",
           "history": measure(["history"]), "history_json": measure(["history", "--json"]),
           "show": measure(["show", str(RUNS // 2)]), "show_json": measure(["show", "--json", str(RUNS)])}
json.dump(results, open(OUTPUT, "w"), indent=2, sort_keys=True)
for key in ["history", "history_json", "show", "show_json"]:
    print("5. guard %s on %d runs: median %.0f ms, worst %.0f ms, peak RSS %.1f MiB" % (key.replace("_", " --"), RUNS, results[key]["ms"]["median"], results[key]["ms"]["worst"], results[key]["peak_rss_mib"]["worst"]), file=sys.stderr)
