"""A consumer's view of a node (services/common/node_view.py): full statuses and the changes that
follow them, in any order the broker may hand them over, never roll the view back."""

from __future__ import annotations

from typing import Any

from services.common import contract, topics
from services.common.node_view import apply_change, merge_status

BOOT = 1764000000000


def status(seq: int, *instances: tuple[str, str], boot: int = BOOT) -> dict[str, Any]:
    doc = {
        "node": "edge-a",
        "status": "online",
        "time": boot + seq,
        "boot": boot,
        "seq": seq,
        "runtimes": ["unix"],
        "instances": [
            {"service": i.split(".")[0], "instance": i, "runtime": "unix", "state": s}
            for i, s in instances
        ],
    }
    contract.validate(topics.node_status("edge-a"), doc)
    return doc


def change(seq: int, instance: str, state: str, boot: int = BOOT, **extra: Any) -> dict[str, Any]:
    doc = {
        "node": "edge-a",
        "boot": boot,
        "seq": seq,
        "time": boot + seq,
        "instance": {
            "service": instance.split(".")[0],
            "instance": instance,
            "runtime": "unix",
            "state": state,
            **extra,
        },
    }
    contract.validate(topics.node_changes("edge-a"), doc)
    return doc


def states(view: dict[str, Any] | None) -> dict[str, str]:
    assert view is not None
    return {i["instance"]: i["state"] for i in view["instances"]}


def test_changes_follow_their_status_and_stopped_removes() -> None:
    view = merge_status(None, status(2, ("a.1", "serving")))
    view, missed = apply_change(view, change(3, "b.1", "waiting"))
    assert not missed and states(view) == {"a.1": "serving", "b.1": "waiting"}
    view, missed = apply_change(view, change(4, "a.1", "paused"))
    view, missed = apply_change(view, change(5, "a.1", "stopped"))
    assert not missed and states(view) == {"b.1": "waiting"}
    assert view is not None and view["seq"] == 5


def test_a_stale_retained_status_after_changes_does_not_roll_back() -> None:
    """A consumer that resubscribes gets the retained status again, older than what it applied."""
    view = merge_status(None, status(2, ("a.1", "serving")))
    view, _ = apply_change(view, change(3, "a.1", "failed", reason="guest exited: code 1"))
    assert merge_status(view, status(2, ("a.1", "serving"))) is None
    assert states(view) == {"a.1": "failed"}
    assert view is not None and view["instances"][0]["reason"] == "guest exited: code 1"


def test_a_change_already_applied_or_of_another_process_does_not_apply() -> None:
    view = merge_status(None, status(4, ("a.1", "serving")))
    assert apply_change(view, change(3, "a.1", "paused")) == (None, False)
    # Changes of a process the view does not know yet: ask for its full status.
    assert apply_change(view, change(1, "a.1", "lost", boot=BOOT + 1)) == (None, True)
    # ... and of an older process: late, ignore.
    assert apply_change(view, change(9, "a.1", "lost", boot=BOOT - 1)) == (None, False)


def test_a_gap_is_reported_so_the_consumer_asks_for_a_full_status() -> None:
    view = merge_status(None, status(2, ("a.1", "serving")))
    view, missed = apply_change(view, change(5, "a.1", "paused"))
    assert missed and states(view) == {"a.1": "paused"}


def test_offline_ends_the_view_unless_it_is_an_earlier_process_will() -> None:
    view = merge_status(None, status(2, ("a.1", "serving")))
    will = {"node": "edge-a", "status": "offline", "time": BOOT, "boot": BOOT}
    offline = merge_status(view, will)
    assert offline == will
    assert apply_change(offline, change(3, "a.1", "paused")) == (None, True)
    # A newer process is online: the will of the one before it is late news.
    newer = merge_status(offline, status(0, boot=BOOT + 5))
    assert newer is not None and merge_status(newer, will) is None
    # A status of an older process never replaces the newer one's.
    assert merge_status(newer, status(9, ("a.1", "serving"))) is None
    # Back online with the same process (it reconnected): its full status replaces offline.
    assert merge_status(offline, status(2, ("a.1", "serving"))) is not None
