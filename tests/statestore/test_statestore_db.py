"""The statestore database on its own: schema version, idempotent writes, event folding."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.statestore.db import SCHEMA_VERSION, Conflict, Database, NotFound

SHA = "ab" * 32


def event(phase: str, time: int, **extra: object) -> dict[str, object]:
    return {
        "migration": "m-1",
        "service": "svc",
        "kind": "migrate",
        "phase": phase,
        "time": time,
        "actor": "scheduler",
        "source": "edge-a",
        "target": "edge-b",
        **extra,
    }


def service(epoch: int, status: str = "serving") -> dict[str, object]:
    return {
        "service": "svc",
        "app": "counter",
        "runtime": "unix",
        "node": "edge-a",
        "instance": f"svc.{epoch}",
        "epoch": epoch,
        "status": status,
        "device": None,
        "params": {"step": 1},
        "image": None,
        "time": 1000 + epoch,
    }


def test_wal_schema_version_and_reopen(tmp_path: Path) -> None:
    db = Database(tmp_path / "deep" / "s.db")
    assert db.schema_version() == SCHEMA_VERSION
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.put_service(service(1))
    db.close()
    again = Database(tmp_path / "deep" / "s.db")
    assert again.get_service("svc")["instance"] == "svc.1"
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Database(tmp_path / "s.db").close()
    import sqlite3

    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer Ferry"):
        Database(tmp_path / "s.db")


def test_service_epoch_fence(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.put_service(service(2))
    db.put_service(service(2, "migrating"))
    with pytest.raises(Conflict) as info:
        db.put_service(service(1))
    assert info.value.code == "stale_epoch"
    assert db.get_service("svc")["status"] == "migrating"
    assert db.delete_service("svc") is True
    assert db.delete_service("svc") is False
    with pytest.raises(NotFound):
        db.get_service("svc")


def test_events_out_of_order_and_twice(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    committed = event("committed", 50, detail={"downtime_ms": 21.5, "bytes_moved": 9})
    assert db.record_event(committed, 1)
    assert db.record_event(event("planned", 10, trigger="operator"), 2)
    assert not db.record_event(committed, 3)  # redelivered: stored once
    assert db.record_event(event("source_paused", 30), 4)
    record = db.get_migration("m-1")
    row = record["migration"]
    assert [e["phase"] for e in record["events"]] == ["planned", "source_paused", "committed"]
    assert row["phase"] == "committed"  # latest by time, not by arrival
    assert row["outcome"] == "committed"
    assert (row["started"], row["finished"]) == (10, 50)
    assert (row["downtime_ms"], row["bytes_moved"], row["trigger"]) == (21.5, 9, "operator")
    assert db.open_migrations() == []


def test_put_migration_does_not_erase_events(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    with pytest.raises(Conflict):
        db.put_migration({"id": "m-1"}, 1)
    db.record_event(event("rolled_back", 40, detail={"error": {"code": "timeout"}}), 1)
    row = db.put_migration({"id": "m-1", "service": "svc", "trigger": "mobility"}, 2)
    assert row["outcome"] == "rolled_back"
    assert row["error"] == {"code": "timeout"}
    assert row["trigger"] == "mobility"


def test_checkpoints_keyed_by_blob(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    base = {"service": "svc", "bucket": "ferry", "sha256": SHA, "size": 3, "watermark": {"p": 1}}
    db.record_checkpoint({**base, "key": "k1", "time": 1})
    db.record_checkpoint({**base, "key": "k2", "time": 2, "migration": "m-1"})
    db.record_checkpoint({**base, "key": "k2", "time": 2})  # redelivered
    latest = db.latest_checkpoint("svc")
    assert latest["checkpoint"]["key"] == "k2"
    assert latest["migration"] == "m-1"
    assert [c["checkpoint"]["key"] for c in db.list_checkpoints("svc")] == ["k2", "k1"]
    with pytest.raises(NotFound) as info:
        db.latest_checkpoint("other")
    assert info.value.code == "no_checkpoint"
