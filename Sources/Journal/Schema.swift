import GRDB

/// The journal's schema, as frozen migrations: each is plain DDL that never refers to the
/// record types, so an old journal always migrates the same way (Docs/journal.md).
enum Schema {
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1 runs, phases, steps, snapshots, samples, events") { db in
            try db.execute(
                sql: """
                    CREATE TABLE runs (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        token TEXT NOT NULL UNIQUE,
                        recipe_name TEXT NOT NULL,
                        recipe_path TEXT NOT NULL,
                        recipe_sha256 TEXT NOT NULL,
                        recipe_text TEXT NOT NULL,
                        host TEXT NOT NULL,
                        user TEXT NOT NULL,
                        pid INTEGER NOT NULL,
                        started_at REAL NOT NULL,
                        finished_at REAL,
                        phase TEXT NOT NULL,
                        state TEXT NOT NULL,
                        decision TEXT,
                        outcome TEXT,
                        exit_code INTEGER,
                        error TEXT,
                        keep_until REAL,
                        suspend_us INTEGER
                    );
                    CREATE INDEX runs_recipe ON runs(recipe_name, started_at);
                    CREATE INDEX runs_state ON runs(state);

                    CREATE TABLE phases (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                        name TEXT NOT NULL,
                        started_at REAL NOT NULL,
                        finished_at REAL,
                        status TEXT NOT NULL,
                        detail TEXT
                    );
                    CREATE INDEX phases_run ON phases(run_id);

                    CREATE TABLE steps (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                        kind TEXT NOT NULL,
                        position INTEGER NOT NULL,
                        name TEXT NOT NULL,
                        argv TEXT NOT NULL,
                        started_at REAL NOT NULL,
                        duration REAL,
                        termination TEXT,
                        exit_code INTEGER,
                        stdout_tail TEXT,
                        stderr_tail TEXT,
                        output_bytes INTEGER
                    );
                    CREATE INDEX steps_run ON steps(run_id);

                    CREATE TABLE snapshots (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                        volume_index INTEGER NOT NULL,
                        volume TEXT NOT NULL,
                        mount_point TEXT,
                        origin_name TEXT NOT NULL,
                        origin_uuid TEXT NOT NULL,
                        origin_device TEXT NOT NULL,
                        origin_table TEXT NOT NULL,
                        origin_bytes INTEGER NOT NULL,
                        cow_path TEXT NOT NULL,
                        cow_kind TEXT NOT NULL,
                        size_bytes INTEGER NOT NULL,
                        chunk_bytes INTEGER NOT NULL,
                        peak_used_bytes INTEGER NOT NULL DEFAULT 0,
                        state TEXT NOT NULL,
                        stack TEXT NOT NULL,
                        UNIQUE(run_id, volume_index)
                    );
                    CREATE INDEX snapshots_state ON snapshots(state);

                    CREATE TABLE cow_samples (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
                        at REAL NOT NULL,
                        used_bytes INTEGER NOT NULL,
                        size_bytes INTEGER NOT NULL
                    );
                    CREATE INDEX cow_samples_snapshot ON cow_samples(snapshot_id);

                    CREATE TABLE events (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                        at REAL NOT NULL,
                        kind TEXT NOT NULL,
                        action TEXT NOT NULL,
                        detail TEXT
                    );
                    CREATE INDEX events_run ON events(run_id);
                    """)
        }
        migrator.registerMigration("v2 restores") { db in
            try db.execute(
                sql: """
                    CREATE TABLE restores (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                        started_at REAL NOT NULL,
                        finished_at REAL,
                        user TEXT NOT NULL,
                        paths TEXT NOT NULL,
                        delete_created INTEGER NOT NULL,
                        status TEXT NOT NULL,
                        files INTEGER NOT NULL DEFAULT 0,
                        bytes INTEGER NOT NULL DEFAULT 0,
                        removed INTEGER NOT NULL DEFAULT 0,
                        detail TEXT
                    );
                    CREATE INDEX restores_run ON restores(run_id);
                    """)
        }
        // SQLite adds a CHECK constraint only by copying a table into a new one. A journal is
        // the record of every rollback guard may still owe, and this migration runs at boot:
        // it must never fail on rows an older guard wrote, or copy them. So the closed sets
        // are enforced by triggers on every later write (the same refusal a CHECK gives:
        // the statement aborts, the transaction rolls back); rows already there are left as
        // they are. The sets are frozen here, not read from the record types.
        migrator.registerMigration("v3 closed sets for states, kinds and outcomes") { db in
            let sets: [(table: String, column: String, values: [String], nullable: Bool)] = [
                ("runs", "state", ["running", "kept", "merging", "finished", "needs_reassembly", "stale"], false),
                ("runs", "decision", ["commit", "keep", "rollback"], true),
                ("runs", "outcome", ["committed", "kept", "rolled_back", "failed", "recovered"], true),
                ("phases", "status", ["started", "done", "failed"], false),
                ("steps", "kind", ["step", "verify", "quiesce", "resume", "rollback-stop", "rollback-start"], false),
                ("snapshots", "state", ["preparing", "live", "merging", "merged", "committed", "discarded", "invalid"], false),
                ("events", "kind", ["intent", "result", "note", "warning", "error"], false),
            ]
            for set in sets {
                try closedSet(db, table: set.table, column: set.column, values: set.values, nullable: set.nullable)
            }
        }
        // Boot assessment's checks are steps of their own kind. The triggers of steps.kind are
        // made again with the larger set (no row is copied or rewritten).
        migrator.registerMigration("v4 verify_after_boot steps") { db in
            for name in ["insert", "update"] { try db.execute(sql: "DROP TRIGGER IF EXISTS steps_kind_\(name)") }
            try closedSet(
                db, table: "steps", column: "kind", values: ["step", "verify", "quiesce", "resume", "rollback-stop", "rollback-start", "verify_after_boot"],
                nullable: false)
        }
        migrator.registerMigration("v5 COW use at the run's end") { db in
            try db.execute(sql: "ALTER TABLE snapshots ADD COLUMN used_at_end_bytes INTEGER")
        }
        return migrator
    }

    /// The migrations applied to the file that this guard does not register, in the order
    /// they were applied: a newer guard's.
    static func unknownMigrations(_ db: Database) throws -> [String] {
        guard try db.tableExists("grdb_migrations") else { return [] }
        let known = Set(migrator.migrations)
        return try String.fetchAll(db, sql: "SELECT identifier FROM grdb_migrations ORDER BY rowid").filter { !known.contains($0) }
    }

    /// Triggers that refuse a write of a value outside `values` to `table.column` (v3's way).
    static func closedSet(_ db: Database, table: String, column: String, values: [String], nullable: Bool) throws {
        let list = values.map { "'\($0)'" }.joined(separator: ", ")
        let outside = "NEW.\(column) NOT IN (\(list))" + (nullable ? " AND NEW.\(column) IS NOT NULL" : "")
        let message = "\(table).\(column) must be one of \(values.joined(separator: ", "))\(nullable ? " or NULL" : "")"
        for (event, name) in [("INSERT", "insert"), ("UPDATE OF \(column)", "update")] {
            try db.execute(
                sql: """
                    CREATE TRIGGER \(table)_\(column)_\(name) BEFORE \(event) ON \(table)
                    WHEN \(outside)
                    BEGIN SELECT RAISE(ABORT, '\(message)'); END
                    """)
        }
    }
}
