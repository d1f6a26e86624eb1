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


def test_a_rollback_that_moves_the_epoch_makes_a_late_claim_lose(tmp_path: Path) -> None:
    """The hand-over's fence, as the statestore sees it: the source's record at epoch 1 is
    migrating; whichever of the target's claim (expects epoch 1) and the rollback (moves the
    record to epoch 2, still naming the source) comes first wins, and the other conflicts."""
    db = Database(tmp_path / "s.db")
    db.put_service(service(1, "migrating"))
    source = {"instance": "svc.1", "epoch": 1}
    rolled_back = {**service(1), "epoch": 2}  # the source serves again, past the plan's epoch
    claim = {**service(2), "node": "edge-b"}  # the target, instance svc.2 at epoch 2
    db.put_service(rolled_back, expect=source)
    with pytest.raises(Conflict) as late:
        db.put_service(claim, expect={**source, "status": "migrating"})
    assert late.value.code == "conflict"
    assert db.get_service("svc")["instance"] == "svc.1"
    # the other order: the claim first, and the rollback is the one refused
    db.put_service({**service(3, "migrating"), "instance": "svc.1"})
    db.put_service({**service(4), "node": "edge-b"}, expect={"instance": "svc.1", "epoch": 3})
    with pytest.raises(Conflict):
        db.put_service({**service(1), "epoch": 4}, expect={"instance": "svc.1", "epoch": 3})
    assert db.get_service("svc")["instance"] == "svc.4"


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


def test_a_plan_and_its_service_mark_are_one_write(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.put_service(service(1))
    serving = {"instance": "svc.1", "status": "serving"}
    plan = {"id": "m-1", "service": "svc", "kind": "migrate", "source": "edge-a"}
    db.put_migration(plan, 2, service={**service(1), "status": "migrating"}, expect=serving)
    assert db.get_service("svc")["status"] == "migrating"
    assert db.get_migration("m-1")["migration"]["kind"] == "migrate"
    # a second plan for the same service is refused whole: no migration row, no mark
    with pytest.raises(Conflict) as refused:
        db.put_migration(
            {**plan, "id": "m-2"}, 3, service={**service(1), "status": "migrating"}, expect=serving
        )
    assert refused.value.code == "conflict"
    with pytest.raises(NotFound):
        db.get_migration("m-2")
    assert db.get_service("svc")["status"] == "migrating"


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


def checkpoint(service: str, n: int, **extra: object) -> dict[str, object]:
    return {"service": service, "bucket": "ferry", "key": f"{service}/{n}", "sha256": SHA,
            "size": 3, "watermark": {"p": n}, "time": n, **extra}  # fmt: skip


def test_storage_is_flat_across_a_thousand_checkpoints(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    for n in range(1, 1001):
        db.record_checkpoint(checkpoint("svc", n), keep=3, due=n)
        assert db.latest_checkpoint("svc")["checkpoint"]["key"] == f"svc/{n}"
        db.forget_garbage(db.due_garbage(now=n))  # what the collector does after S3 deletes
        assert db.storage_counts()["checkpoints"] == min(n, 3)
        assert db.storage_counts()["blob_garbage"] == 0
    assert [c["time"] for c in db.list_checkpoints("svc")] == [1000, 999, 998]
    # keep=0 still keeps the latest: a service is never left without its state.
    db.record_checkpoint(checkpoint("svc", 1001), keep=0, due=0)
    assert [c["time"] for c in db.list_checkpoints("svc")] == [1001]


def test_garbage_waits_for_its_grace_and_a_re_recorded_blob_is_live(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.record_checkpoint(checkpoint("svc", 1), keep=1, due=50)
    db.record_checkpoint(checkpoint("svc", 2), keep=1, due=50)
    assert db.due_garbage(now=49) == []
    assert db.next_garbage_due() == 50
    assert db.due_garbage(now=50) == [("ferry", "svc/1")]
    # Redelivered before its blob went: recorded again and newest by time, so live again.
    db.record_checkpoint(checkpoint("svc", 1, time=3), keep=1, due=60)
    assert db.due_garbage(now=100) == [("ferry", "svc/2")]
    assert db.latest_checkpoint("svc")["checkpoint"]["key"] == "svc/1"


def test_collect_retires_stopped_and_deleted_services_and_old_migrations(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    for name in ("stopped", "deleted", "serving"):
        db.put_service({**service(1), "service": name, "time": 100})
        db.record_checkpoint(checkpoint(name, 1))
    db.put_service({**service(2), "service": "stopped", "status": "stopped", "time": 100})
    db.delete_service("deleted", now=100)
    db.record_event(event("planned", 10), now=100)
    db.record_event(event("committed", 20), now=100)
    db.record_event({**event("planned", 30), "migration": "m-open"}, now=100)
    # Inside every grace: nothing goes.
    nothing = db.collect(now=150, keep=3, stopped_before=100, finished_before=100, due=150)
    assert nothing == {"checkpoints": 0, "migrations": 0, "forgotten": [], "deleted": []}
    done = db.collect(now=200, keep=3, stopped_before=101, finished_before=101, due=200)
    assert done["forgotten"] == ["stopped"] and done["deleted"] == ["deleted"]
    assert (done["checkpoints"], done["migrations"]) == (2, 1)
    assert sorted(db.due_garbage(now=200)) == [("ferry", "deleted/1"), ("ferry", "stopped/1")]
    with pytest.raises(NotFound):
        db.get_service("stopped")
    with pytest.raises(NotFound):
        db.get_migration("m-1")
    assert db.get_migration("m-open")["events"]  # an open migration is never pruned
    assert db.latest_checkpoint("serving")["checkpoint"]["key"] == "serving/1"
    assert db.storage_counts()["migration_events"] == 1
    assert db.storage_counts()["retired"] == 0
    # A redeployed service is not retired by its old deletion.
    db.delete_service("serving", now=300)
    db.put_service({**service(3), "service": "serving"})
    db.collect(now=400, keep=3, stopped_before=400, finished_before=0, due=400)
    assert db.latest_checkpoint("serving")["checkpoint"]["key"] == "serving/1"


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    from services.statestore.db import _SCHEMA

    conn = sqlite3.connect(tmp_path / "s.db")
    conn.executescript(_SCHEMA[1])
    conn.execute(
        "INSERT INTO checkpoints (service, bucket, key, sha256, size, watermark, time) "
        "VALUES ('svc', 'ferry', 'old', ?, 1, '{}', 1)",
        (SHA,),
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    db = Database(tmp_path / "s.db")
    assert db.schema_version() == SCHEMA_VERSION == 4
    assert db.latest_checkpoint("svc")["checkpoint"]["key"] == "old"
    db.record_checkpoint(checkpoint("svc", 2), keep=1, due=0)
    assert db.due_garbage(now=0) == [("ferry", "old")]


def test_a_batch_commits_once_and_a_refused_write_undoes_only_itself(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    db.put_service(service(1))
    before = db.commits
    other = {**service(1), "service": "other"}
    outcomes = db.batch(
        [
            lambda: db.put_service({**service(2), "node": "edge-b"}),
            lambda: db.put_service({**service(3)}, expect={"instance": "svc.9"}),  # refused
            lambda: db.put_service(other),
        ]
    )
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert isinstance(outcomes[1][1], Conflict)
    assert db.commits == before + 1
    assert db.get_service("svc")["epoch"] == 2 and db.get_service("other")["epoch"] == 1


def test_node_changes_update_the_stored_status_and_a_stale_status_does_not(tmp_path: Path) -> None:
    """list_nodes stays current between full statuses, and the retained status a resubscribing
    statestore gets again (older than the changes applied since) leaves it so."""
    db = Database(tmp_path / "s.db")
    instance = {"service": "svc", "instance": "svc.1", "runtime": "unix", "state": "serving"}
    full = {
        "node": "edge-a",
        "status": "online",
        "time": 1000,
        "boot": 900,
        "seq": 0,
        "instances": [instance],
    }
    assert db.upsert_node(full, 1)
    change = {"node": "edge-a", "boot": 900, "seq": 1, "time": 1100}
    assert db.apply_node_change({**change, "instance": {**instance, "state": "paused"}}, 2)
    assert not db.apply_node_change({**change, "instance": {**instance, "state": "paused"}}, 3)
    assert not db.upsert_node(full, 4)
    [node] = db.list_nodes()
    assert node["seq"] == 1 and [i["state"] for i in node["instances"]] == ["paused"]
    stopped = {**change, "seq": 2, "instance": {**instance, "state": "stopped"}}
    assert db.apply_node_change(stopped, 5)
    assert db.list_nodes()[0]["instances"] == []
    # The last will (same process) replaces it; a change after it waits for a full status.
    assert db.upsert_node({"node": "edge-a", "status": "offline", "time": 950, "boot": 900}, 6)
    assert not db.apply_node_change({**change, "seq": 3, "instance": instance}, 7)
    assert db.list_nodes()[0]["status"] == "offline"
    db.close()
