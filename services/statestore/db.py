"""The statestore's SQLite database: schema, migrations of that schema, and every query.

Pure ``sqlite3``, no MQTT and no asyncio: ``service.py`` calls these methods from one dedicated
worker thread, so each method is one short transaction and all writes are serialised. The writes
that arrive together go through ``batch``: one transaction, one commit (one WAL sync) for all of
them, each inside a savepoint of its own so that one refused write undoes only itself.

Why WAL + ``synchronous=FULL``: the service acknowledges an MQTT message only after its write is
committed, and an acknowledged message is never delivered again. With ``NORMAL`` a committed WAL
transaction can still vanish on power loss, and the message behind it would be lost for good;
``FULL`` syncs the WAL on every commit, a cost of about a millisecond per write at the statestore's
write rate (a few events per migration).

Every write is idempotent, because the broker redelivers whatever was not acknowledged: services
and migrations are upserts, a checkpoint is keyed by its blob (service, key), and a migration event
by (migration, phase, time, actor).

Retention (schema version 2): a checkpoint that falls out of a service's newest ``keep`` (and that
no open migration names) leaves ``checkpoints`` in the same transaction that recorded its successor
and goes to ``blob_garbage``, which the service drains by deleting the S3 objects once they are due
(see ``service.py``). The queue is a table, not memory, so a crash or an unreachable S3 store
delays a deletion but never forgets one. Services stopped or deleted longer than a grace ago lose
their checkpoints the same way; finished migrations older than the retention period are pruned
with their events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from services.common import node_view

SCHEMA_VERSION = 4

# One script per schema version; a database at version n runs scripts n+1.. on open.
_SCHEMA: dict[int, str] = {
    1: """
    CREATE TABLE nodes (
        name      TEXT PRIMARY KEY,
        status    TEXT NOT NULL,
        doc       TEXT NOT NULL,            -- the last node-status document, verbatim
        time      INTEGER NOT NULL,         -- the document's own time
        received  INTEGER NOT NULL
    );
    CREATE TABLE services (
        name      TEXT PRIMARY KEY,
        app       TEXT NOT NULL,
        runtime   TEXT NOT NULL,
        node      TEXT,
        instance  TEXT,
        epoch     INTEGER NOT NULL,
        status    TEXT NOT NULL,
        device    TEXT,
        params    TEXT,                     -- JSON object or NULL
        image     TEXT,                     -- JSON blob_ref or NULL
        time      INTEGER NOT NULL
    );
    CREATE TABLE checkpoints (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        service   TEXT NOT NULL,
        bucket    TEXT NOT NULL,
        key       TEXT NOT NULL,
        sha256    TEXT NOT NULL,
        size      INTEGER NOT NULL,
        watermark TEXT NOT NULL,            -- JSON object producer -> last applied sequence
        time      INTEGER NOT NULL,
        migration TEXT,
        UNIQUE (service, key)
    );
    CREATE INDEX checkpoints_by_service ON checkpoints (service, time);
    CREATE TABLE migrations (
        id          TEXT PRIMARY KEY,
        service     TEXT NOT NULL,
        kind        TEXT NOT NULL DEFAULT 'migrate',
        trigger     TEXT,
        source      TEXT,
        target      TEXT,
        phase       TEXT,                   -- the latest phase
        outcome     TEXT,                   -- NULL until committed / rolled_back / failed
        started     INTEGER,
        finished    INTEGER,
        downtime_ms REAL,
        bytes_moved INTEGER,
        total_ms    REAL,
        error       TEXT,                   -- JSON (a string or an object) or NULL
        plan        TEXT,                 -- JSON: the scheduler's plan (to finish it after a crash)
        created     INTEGER NOT NULL,
        updated     INTEGER NOT NULL
    );
    CREATE INDEX migrations_open ON migrations (outcome, started);
    CREATE INDEX migrations_by_service ON migrations (service, started);
    CREATE TABLE migration_events (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        migration TEXT NOT NULL,
        phase     TEXT NOT NULL,
        time      INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        source    TEXT,
        target    TEXT,
        detail    TEXT,                     -- JSON object or NULL
        doc       TEXT NOT NULL,            -- the event document, verbatim
        UNIQUE (migration, phase, time, actor)
    );
    """,
    2: """
    CREATE TABLE blob_garbage (
        bucket    TEXT NOT NULL,
        key       TEXT NOT NULL,
        due       INTEGER NOT NULL,         -- ms: not deleted before (a reader may still fetch it)
        PRIMARY KEY (bucket, key)
    );
    CREATE INDEX blob_garbage_by_due ON blob_garbage (due);
    CREATE TABLE retired (
        service   TEXT PRIMARY KEY,         -- deleted by delete_service at ``since`` (ms):
        since     INTEGER NOT NULL          -- its checkpoints go after a grace
    );
    CREATE INDEX migrations_by_update ON migrations (outcome, updated);
    """,
    3: """
    ALTER TABLE services ADD COLUMN version TEXT;       -- the app version it runs, if known
    ALTER TABLE migrations ADD COLUMN from_version TEXT; -- an upgrade's versions
    ALTER TABLE migrations ADD COLUMN to_version TEXT;
    """,
    4: """
    CREATE TABLE cordons (
        node      TEXT PRIMARY KEY,
        doc       TEXT NOT NULL,            -- the last node-cordon document, verbatim
        time      INTEGER NOT NULL
    );
    """,
}

TERMINAL_PHASES = ("committed", "rolled_back", "failed")
DEFAULT_LIMIT = 100
# How long a write waits for another process's lock before it fails (and is retried later).
BUSY_TIMEOUT_S = 5.0

_MIGRATION_COLUMNS = (
    "id, service, kind, trigger, source, target, phase, outcome, started, finished, "
    "downtime_ms, bytes_moved, total_ms, error, plan, from_version, to_version, created, updated"
)
# put_migration may set these; None in a record clears nothing (absent and null are alike).
_MIGRATION_FIELDS = (
    "service", "kind", "trigger", "source", "target", "phase", "outcome",
    "started", "finished", "downtime_ms", "bytes_moved", "total_ms", "error", "plan",
    "from_version", "to_version",
)  # fmt: skip


class NotFound(LookupError):
    """The named row does not exist; ``code`` is the error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Conflict(ValueError):
    """The write contradicts what is stored (e.g. an older epoch); ``code`` names why."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class Database:
    """One open statestore database; use from a single thread (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx).
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        self._batching = False
        #: Commits made and writes they carried (``batch``): what group commit saves.
        self.commits = 0
        self.batched_writes = 0
        self._upgrade()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so a second process fails fast instead of mid-way.
        Inside ``batch``, a savepoint of the batch's transaction instead."""
        if self._batching:
            self.conn.execute("SAVEPOINT write")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:  # not if SQLite already rolled it all back
                    self.conn.execute("ROLLBACK TO write")
                    self.conn.execute("RELEASE write")
                raise
            self.conn.execute("RELEASE write")
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        self.commits += 1

    def batch(self, writes: Sequence[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Run ``writes`` (calls of this class's write methods) in one transaction: one commit
        for all, and for each ``(True, result)`` or ``(False, exception)``. A write that raises
        is undone alone (its savepoint); if the commit itself fails, every write fails with it."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._batching = True
        outcomes: list[tuple[bool, Any]] = []
        try:
            for write in writes:
                try:
                    outcomes.append((True, write()))
                except Exception as exc:
                    if not self.conn.in_transaction:  # SQLite rolled the whole batch back
                        return [(False, exc)] * len(writes)
                    outcomes.append((False, exc))
        finally:
            self._batching = False
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            return [(False, exc)] * len(writes)
        self.commits += 1
        self.batched_writes += len(writes)
        return outcomes

    def _upgrade(self) -> None:
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} has schema version {version}; this statestore knows only "
                f"up to {SCHEMA_VERSION} (was it written by a newer Ferry?)"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx() as conn:
                for statement in _SCHEMA[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target}")

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # -- nodes -------------------------------------------------------------------------------

    def upsert_node(self, doc: dict[str, Any], received: int) -> bool:
        """Store a full node status unless the stored view is newer (``node_view``: by the
        executor's boot and change number); True if it was stored."""
        with self._tx() as conn:
            merged = node_view.merge_status(self._node(conn, doc["node"]), doc)
            if merged is not None:
                self._put_node(conn, merged, received)
            return merged is not None

    def apply_node_change(self, change: dict[str, Any], received: int) -> bool:
        """Apply one instance change to the stored node view; True if it applied (a change of
        another executor process, or one already applied, waits for the next full status)."""
        with self._tx() as conn:
            merged, _ = node_view.apply_change(self._node(conn, change["node"]), change)
            if merged is not None:
                self._put_node(conn, merged, received)
            return merged is not None

    @staticmethod
    def _node(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
        row = conn.execute("SELECT doc FROM nodes WHERE name = ?", (name,)).fetchone()
        return orjson.loads(row[0]) if row is not None else None

    @staticmethod
    def _put_node(conn: sqlite3.Connection, doc: dict[str, Any], received: int) -> None:
        conn.execute(
            "INSERT INTO nodes (name, status, doc, time, received) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET status = excluded.status, doc = excluded.doc, "
            "time = excluded.time, received = excluded.received",
            (doc["node"], doc["status"], _dumps(doc), doc["time"], received),
        )

    def put_cordon(self, doc: dict[str, Any]) -> bool:
        """Store a node-cordon document unless a newer one is stored; True if it was stored."""
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT INTO cordons (node, doc, time) VALUES (?, ?, ?) "
                "ON CONFLICT (node) DO UPDATE SET doc = excluded.doc, time = excluded.time "
                "WHERE excluded.time >= cordons.time",
                (doc["node"], _dumps(doc), doc["time"]),
            )
            return cursor.rowcount > 0

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every node's last status document, by name, with its cordon if it is cordoned."""
        rows = self.conn.execute(
            "SELECT nodes.doc AS doc, cordons.doc AS cordon FROM nodes "
            "LEFT JOIN cordons ON cordons.node = nodes.name ORDER BY nodes.name"
        ).fetchall()
        nodes = []
        for row in rows:
            doc = orjson.loads(row["doc"])
            cordon = orjson.loads(row["cordon"]) if row["cordon"] else None
            if cordon is not None and cordon["cordoned"]:
                doc["cordon"] = cordon
            nodes.append(doc)
        return nodes

    # -- services ----------------------------------------------------------------------------

    def put_service(
        self, doc: dict[str, Any], expect: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store a complete service-state document; refuse one with an older epoch.

        Why the epoch check: the statestore's session is persistent, so a request that sat in
        the broker while the statestore was down can arrive after newer ones; a lower epoch
        is such a stale write and must not roll the record back.
        ``expect`` makes it a compare-and-set: the stored record must still have those values
        (a commit and a paused source claiming its service back cannot both win).
        """
        with self._tx() as conn:
            self._write_service(conn, doc, expect)
        return self.get_service(doc["service"])

    @staticmethod
    def _write_service(
        conn: sqlite3.Connection, doc: dict[str, Any], expect: dict[str, Any] | None
    ) -> None:
        """``put_service``'s checks and write, inside the caller's transaction."""
        row = conn.execute(
            "SELECT epoch, instance, status FROM services WHERE name = ?", (doc["service"],)
        ).fetchone()
        for field_name, wanted in (expect or {}).items():
            stored = row[field_name] if row is not None else None
            if stored != wanted:
                raise Conflict(
                    "conflict",
                    f"service {doc['service']!r} has {field_name} {stored!r}, "
                    f"not {wanted!r}; refusing the write",
                    {field_name: stored},
                )
        if row is not None and doc["epoch"] < row["epoch"]:
            raise Conflict(
                "stale_epoch",
                f"service {doc['service']!r} is at epoch {row['epoch']}; "
                f"refusing a record with epoch {doc['epoch']}",
                {"stored_epoch": row["epoch"]},
            )
        params = doc.get("params")
        image = doc.get("image")
        conn.execute("DELETE FROM retired WHERE service = ?", (doc["service"],))
        conn.execute(
            "INSERT OR REPLACE INTO services (name, app, runtime, node, instance, epoch, "
            "status, device, params, image, version, time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                doc["service"],
                doc["app"],
                doc["runtime"],
                doc.get("node"),
                doc.get("instance"),
                doc["epoch"],
                doc["status"],
                doc.get("device"),
                None if params is None else _dumps(params),
                None if image is None else _dumps(image),
                doc.get("version"),
                doc["time"],
            ),
        )

    def get_service(self, name: str) -> dict[str, Any]:
        """The service-state document of ``name``; NotFound('unknown_service') if none."""
        row = self.conn.execute("SELECT * FROM services WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound("unknown_service", f"no service {name!r}")
        return _service_doc(row)

    def list_services(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM services ORDER BY name").fetchall()
        return [_service_doc(row) for row in rows]

    def delete_service(self, name: str, now: int = 0) -> bool:
        """Forget a service; True if it existed. Its migrations stay as history (until the
        retention period), its checkpoints until ``collect`` retires them after a grace
        counted from ``now`` (0: the next sweep, as a purge wants)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO retired (service, since) VALUES (?, ?) ON CONFLICT (service) "
                "DO UPDATE SET since = MIN(since, excluded.since)",
                (name, now),
            )
            return conn.execute("DELETE FROM services WHERE name = ?", (name,)).rowcount > 0

    # -- checkpoints -------------------------------------------------------------------------

    def record_checkpoint(
        self, record: dict[str, Any], keep: int | None = None, due: int = 0
    ) -> dict[str, Any]:
        """Store a checkpoint (flat fields, see ``_checkpoint_doc``); the same key twice is one.

        A record naming its ``instance`` is refused (``not_owner``) unless the service record
        names that instance: a copy that was fenced off must never become the recovery point.
        With ``keep``, the service's checkpoints beyond its newest ``keep`` go to the blob
        garbage (deletable from ``due`` on) in the same transaction: one commit, one fsync.
        """
        with self._tx() as conn:
            if record.get("instance"):
                owner = conn.execute(
                    "SELECT instance FROM services WHERE name = ?", (record["service"],)
                ).fetchone()
                if owner is not None and owner["instance"] != record["instance"]:
                    raise Conflict(
                        "not_owner",
                        f"service {record['service']!r} is served by {owner['instance']!r}, "
                        f"not {record['instance']!r}; checkpoint not recorded",
                    )
            # Recorded again (a redelivery, or a key reused): the blob is live, not garbage.
            conn.execute(
                "DELETE FROM blob_garbage WHERE bucket = ? AND key = ?",
                (record["bucket"], record["key"]),
            )
            conn.execute(
                "INSERT INTO checkpoints (service, bucket, key, sha256, size, watermark, time, "
                "migration) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (service, key) DO UPDATE "
                "SET bucket = excluded.bucket, sha256 = excluded.sha256, size = excluded.size, "
                "watermark = excluded.watermark, time = excluded.time, "
                "migration = COALESCE(excluded.migration, checkpoints.migration)",
                (
                    record["service"],
                    record["bucket"],
                    record["key"],
                    record["sha256"],
                    record["size"],
                    _dumps(record["watermark"]),
                    record["time"],
                    record.get("migration"),
                ),
            )
            row = conn.execute(
                "SELECT * FROM checkpoints WHERE service = ? AND key = ?",
                (record["service"], record["key"]),
            ).fetchone()
            if keep is not None:
                _retire_checkpoints(conn, record["service"], max(1, keep), due)
        return _checkpoint_doc(row)

    def latest_checkpoint(self, service: str) -> dict[str, Any]:
        """The newest checkpoint of ``service``; NotFound('no_checkpoint') if it has none."""
        row = self.conn.execute(
            "SELECT * FROM checkpoints WHERE service = ? ORDER BY time DESC, id DESC LIMIT 1",
            (service,),
        ).fetchone()
        if row is None:
            raise NotFound("no_checkpoint", f"no checkpoint recorded for service {service!r}")
        return _checkpoint_doc(row)

    def list_checkpoints(self, service: str, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
        """Checkpoints of ``service``, newest first."""
        rows = self.conn.execute(
            "SELECT * FROM checkpoints WHERE service = ? ORDER BY time DESC, id DESC LIMIT ?",
            (service, limit),
        ).fetchall()
        return [_checkpoint_doc(row) for row in rows]

    # -- retention ---------------------------------------------------------------------------

    def collect(
        self, now: int, keep: int, stopped_before: int, finished_before: int, due: int
    ) -> dict[str, Any]:
        """One retention sweep (cheap when there is nothing to do: reads first, writes only if
        needed). Returns ``{"checkpoints": n, "migrations": n, "forgotten": [...],
        "deleted": [...]}``: the forgotten (stopped) services had their record deleted, so their
        retained state is stale; the deleted ones were retired after their grace.

        - every service's checkpoints beyond its newest ``keep`` (catch-up after a change of
          ``keep``; normally ``record_checkpoint`` already did it);
        - all checkpoints of services stopped (status ``stopped``, last written before
          ``stopped_before``) or deleted before ``stopped_before``; a stopped one is forgotten;
        - finished migrations last updated before ``finished_before``, with their events.
        """
        conn = self.conn
        over = conn.execute(
            "SELECT service FROM checkpoints GROUP BY service HAVING COUNT(*) > ?", (max(1, keep),)
        ).fetchall()
        stopped = [
            row["name"]
            for row in conn.execute(
                "SELECT name FROM services WHERE status = 'stopped' AND time < ?",
                (stopped_before,),
            )
        ]
        deleted = [
            row["service"]
            for row in conn.execute(
                "SELECT service FROM retired WHERE since < ?", (stopped_before,)
            )
        ]
        old = conn.execute(
            "SELECT COUNT(*) FROM migrations WHERE outcome IS NOT NULL AND updated < ?",
            (finished_before,),
        ).fetchone()[0]
        result: dict[str, Any] = {
            "checkpoints": 0,
            "migrations": old,
            "forgotten": stopped,
            "deleted": deleted,
        }
        if not (over or stopped or deleted or old):
            return result
        with self._tx() as tx:
            for row in over:
                result["checkpoints"] += _retire_checkpoints(tx, row["service"], max(1, keep), due)
            for service in [*stopped, *deleted]:
                result["checkpoints"] += _retire_checkpoints(tx, service, 0, due)
                tx.execute("DELETE FROM retired WHERE service = ?", (service,))
            for service in stopped:
                tx.execute("DELETE FROM services WHERE name = ? AND status = 'stopped'", (service,))
            if old:
                finished = "SELECT id FROM migrations WHERE outcome IS NOT NULL AND updated < ?"
                tx.execute(
                    f"DELETE FROM migration_events WHERE migration IN ({finished})",
                    (finished_before,),
                )
                tx.execute(
                    "DELETE FROM migrations WHERE outcome IS NOT NULL AND updated < ?",
                    (finished_before,),
                )
        return result

    def due_garbage(self, now: int, limit: int = 200) -> list[tuple[str, str]]:
        """Blobs (bucket, key) whose deletion is due and that no checkpoint names any more."""
        rows = self.conn.execute(
            "SELECT bucket, key FROM blob_garbage g WHERE due <= ? AND NOT EXISTS "
            "(SELECT 1 FROM checkpoints c WHERE c.bucket = g.bucket AND c.key = g.key) "
            "ORDER BY due LIMIT ?",
            (now, limit),
        ).fetchall()
        return [(row["bucket"], row["key"]) for row in rows]

    def next_garbage_due(self) -> int | None:
        """When the next blob deletion is due (ms), or None if nothing waits."""
        value = self.conn.execute("SELECT MIN(due) FROM blob_garbage").fetchone()[0]
        return None if value is None else int(value)

    def forget_garbage(self, blobs: list[tuple[str, str]]) -> None:
        """The blobs are deleted from S3 (or were never there): drop them from the queue. A
        blob recorded again meanwhile has no garbage row any more, so nothing live is lost."""
        if not blobs:
            return
        with self._tx() as conn:
            conn.executemany("DELETE FROM blob_garbage WHERE bucket = ? AND key = ?", blobs)
            # A blob named by a checkpoint again is live: drop its garbage entry too.
            conn.execute(
                "DELETE FROM blob_garbage WHERE EXISTS (SELECT 1 FROM checkpoints c "
                "WHERE c.bucket = blob_garbage.bucket AND c.key = blob_garbage.key)"
            )

    def storage_counts(self) -> dict[str, int]:
        """Rows per table: what retention keeps bounded (for tests and operators)."""
        tables = ("nodes", "services", "checkpoints", "migrations", "migration_events",
                  "blob_garbage", "retired")  # fmt: skip
        count = "SELECT COUNT(*) FROM {}"
        return {t: int(self.conn.execute(count.format(t)).fetchone()[0]) for t in tables}

    # -- migrations --------------------------------------------------------------------------

    def put_migration(
        self,
        record: dict[str, Any],
        now: int,
        service: dict[str, Any] | None = None,
        expect: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create or update a migration from ``record`` (``id`` + any of _MIGRATION_FIELDS).

        Only the fields present and non-null are written, so a late or repeated record never
        erases what events already filled in. A new migration needs ``service``. With
        ``service`` (a service-state document), that record is stored in the same transaction,
        compare-and-set by ``expect`` as ``put_service`` does it: a move is planned and its
        service marked migrating together, or neither is (Conflict).
        """
        fields = {k: record[k] for k in _MIGRATION_FIELDS if record.get(k) is not None}
        for name in ("error", "plan"):
            if name in fields:
                fields[name] = _dumps(fields[name])
        with self._tx() as conn:
            if service is not None:
                self._write_service(conn, service, expect)
            exists = conn.execute(
                "SELECT 1 FROM migrations WHERE id = ?", (record["id"],)
            ).fetchone()
            if exists is None:
                if "service" not in fields:
                    raise Conflict(
                        "invalid_record", f"migration {record['id']!r} is new: it needs 'service'"
                    )
                names = ["id", *fields, "created", "updated"]
                conn.execute(
                    f"INSERT INTO migrations ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' * len(names))})",
                    (record["id"], *fields.values(), now, now),
                )
            else:
                assignments = ", ".join(f"{name} = ?" for name in [*fields, "updated"])
                conn.execute(
                    f"UPDATE migrations SET {assignments} WHERE id = ?",
                    (*fields.values(), now, record["id"]),
                )
        return self._migration_row(record["id"])

    def record_event(self, event: dict[str, Any], now: int) -> bool:
        """Store a migration event and fold it into its migration row; False if already stored.

        The row is created if the event comes first. Its phase is that of the latest event by
        time (a terminal phase wins a tie), not the last to arrive, since a redelivered event
        can arrive after its successors.
        """
        detail = event.get("detail")
        with self._tx() as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO migration_events (migration, phase, time, actor, source, "
                "target, detail, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event["migration"],
                    event["phase"],
                    event["time"],
                    event["actor"],
                    event.get("source"),
                    event.get("target"),
                    None if detail is None else _dumps(detail),
                    _dumps(event),
                ),
            ).rowcount
            if not inserted:
                return False
            conn.execute(
                "INSERT INTO migrations (id, service, kind, trigger, source, target, started, "
                "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET kind = COALESCE(?, migrations.kind), "
                "trigger = COALESCE(migrations.trigger, excluded.trigger), "
                "source = COALESCE(migrations.source, excluded.source), "
                "target = COALESCE(migrations.target, excluded.target), "
                "started = MIN(COALESCE(migrations.started, excluded.started), excluded.started), "
                "updated = excluded.updated",
                (
                    event["migration"],
                    event["service"],
                    event.get("kind") or "migrate",
                    event.get("trigger"),
                    event.get("source"),
                    event.get("target"),
                    event["time"],
                    now,
                    now,
                    event.get("kind"),
                ),
            )
            latest = conn.execute(
                "SELECT phase FROM migration_events WHERE migration = ? ORDER BY time DESC, "
                f"phase IN {TERMINAL_PHASES!r} DESC, seq DESC LIMIT 1",
                (event["migration"],),
            ).fetchone()
            conn.execute(
                "UPDATE migrations SET phase = ? WHERE id = ?",
                (latest["phase"], event["migration"]),
            )
            if event["phase"] in TERMINAL_PHASES:
                detail = detail or {}
                error = detail.get("error")
                conn.execute(
                    "UPDATE migrations SET outcome = ?, finished = ?, "
                    "downtime_ms = COALESCE(?, downtime_ms), "
                    "bytes_moved = COALESCE(?, bytes_moved), total_ms = COALESCE(?, total_ms), "
                    "error = COALESCE(?, error) WHERE id = ?",
                    (
                        event["phase"],
                        event["time"],
                        _number(detail.get("downtime_ms")),
                        _number(detail.get("bytes_moved")),
                        _number(detail.get("total_ms")),
                        None if error is None else _dumps(error),
                        event["migration"],
                    ),
                )
        return True

    def get_migration(self, migration: str) -> dict[str, Any]:
        """The migration row and all its events (oldest first); NotFound('unknown_migration')."""
        row = self._migration_row(migration)
        events = self.conn.execute(
            "SELECT doc FROM migration_events WHERE migration = ? ORDER BY time, seq",
            (migration,),
        ).fetchall()
        return {"migration": row, "events": [orjson.loads(e["doc"]) for e in events]}

    def list_migrations(
        self, limit: int = DEFAULT_LIMIT, service: str | None = None
    ) -> list[dict[str, Any]]:
        """Migrations newest first (by start), optionally of one service."""
        where, args = ("WHERE service = ?", [service]) if service else ("", [])
        rows = self.conn.execute(
            f"SELECT {_MIGRATION_COLUMNS} FROM migrations {where} "
            "ORDER BY COALESCE(started, created) DESC, created DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [_migration_doc(row) for row in rows]

    def open_migrations(self) -> list[dict[str, Any]]:
        """Migrations without an outcome yet, oldest first (the order to settle them in)."""
        rows = self.conn.execute(
            f"SELECT {_MIGRATION_COLUMNS} FROM migrations WHERE outcome IS NULL "
            "ORDER BY COALESCE(started, created), created"
        ).fetchall()
        return [_migration_doc(row) for row in rows]

    def _migration_row(self, migration: str) -> dict[str, Any]:
        row = self.conn.execute(
            f"SELECT {_MIGRATION_COLUMNS} FROM migrations WHERE id = ?", (migration,)
        ).fetchone()
        if row is None:
            raise NotFound("unknown_migration", f"no migration {migration!r}")
        return _migration_doc(row)


def _retire_checkpoints(conn: sqlite3.Connection, service: str, keep: int, due: int) -> int:
    """Move ``service``'s checkpoints beyond its newest ``keep`` to the blob garbage; one that an
    open migration names stays (its target may still be fetching it). Returns how many went."""
    rows = conn.execute(
        "SELECT id, bucket, key FROM checkpoints WHERE service = ? AND (migration IS NULL OR "
        "migration NOT IN (SELECT id FROM migrations WHERE outcome IS NULL)) "
        "AND id NOT IN (SELECT id FROM checkpoints WHERE service = ? "
        "ORDER BY time DESC, id DESC LIMIT ?)",
        (service, service, keep),
    ).fetchall()
    if not rows:
        return 0
    conn.executemany(
        "INSERT INTO blob_garbage (bucket, key, due) VALUES (?, ?, ?) "
        "ON CONFLICT (bucket, key) DO UPDATE SET due = MAX(due, excluded.due)",
        [(row["bucket"], row["key"], due) for row in rows],
    )
    conn.executemany("DELETE FROM checkpoints WHERE id = ?", [(row["id"],) for row in rows])
    return len(rows)


def _number(value: Any) -> float | int | None:
    """A numeric detail field, or None if absent or not a number (bad detail is not fatal)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _service_doc(row: sqlite3.Row) -> dict[str, Any]:
    """A services row as a service-state document (schemas/service-state.schema.json)."""
    doc: dict[str, Any] = {
        "service": row["name"],
        "app": row["app"],
        "runtime": row["runtime"],
        "node": row["node"],
        "instance": row["instance"],
        "epoch": row["epoch"],
        "status": row["status"],
        "device": row["device"],
        "image": _loads(row["image"]),
        "version": row["version"],
        "time": row["time"],
    }
    if row["params"] is not None:
        doc["params"] = orjson.loads(row["params"])
    return doc


def _checkpoint_doc(row: sqlite3.Row) -> dict[str, Any]:
    """A checkpoints row; ``checkpoint`` is a blob_ref, ready for an executor's restore."""
    return {
        "id": row["id"],
        "service": row["service"],
        "checkpoint": {
            "bucket": row["bucket"],
            "key": row["key"],
            "sha256": row["sha256"],
            "size": row["size"],
        },
        "watermark": orjson.loads(row["watermark"]),
        "time": row["time"],
        "migration": row["migration"],
    }


def _migration_doc(row: sqlite3.Row) -> dict[str, Any]:
    doc = dict(row)
    doc["error"] = _loads(doc["error"])
    doc["plan"] = _loads(doc["plan"])
    return doc
