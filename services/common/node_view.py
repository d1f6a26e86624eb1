"""A consumer's own view of one node: the last full status, with the instance changes since.

Why: an executor publishes its full status only when it connects and every
``executor.status_interval``; in between it publishes one small change per instance state
(``ferry/v1/nodes/{node}/changes``). The scheduler and the statestore each keep the node's view by
the same rules, here. Order comes from ``boot`` (when the executor process started) and ``seq``
(its changes, numbered 1, 2, ...; a status carries the last one it includes): a retained status
that is older than changes already applied (a consumer that resubscribes gets the retained copy
again) never rolls the view back.
"""

from __future__ import annotations

from typing import Any


def _order(doc: dict[str, Any]) -> tuple[int, int]:
    return int(doc.get("boot") or 0), int(doc.get("seq") or 0)


def merge_status(view: dict[str, Any] | None, status: dict[str, Any]) -> dict[str, Any] | None:
    """The view after a full status (or the last will), or None if the status is older.

    ``offline`` (the will, or a clean stop) ends the view unless it is the will of an earlier
    process than the one the view already follows.
    """
    if view is None:
        return status
    if status.get("status") != "online":
        if status.get("boot") and _order(view)[0] > int(status["boot"]):
            return None
        return status
    if view.get("status") != "online":
        return status
    return status if _order(status) >= _order(view) else None


def apply_change(
    view: dict[str, Any] | None, change: dict[str, Any]
) -> tuple[dict[str, Any] | None, bool]:
    """The view after one instance change (None: not applicable), and whether changes were missed.

    A change applies to an online view of the same process with a lower ``seq``; one of another
    process or for an offline node waits for that process's next full status. ``missed`` is True
    when the change does not follow the view directly (a gap, or a process the view does not know):
    the consumer should ask the executor for a full status (its ``status`` command).
    """
    if view is None or view.get("status") != "online":
        return None, True
    boot, seq = int(change["boot"]), int(change["seq"])
    view_boot, view_seq = _order(view)
    if boot != view_boot:
        return None, boot > view_boot
    if seq <= view_seq:
        return None, False
    entry = change["instance"]
    instances = [dict(i) for i in view.get("instances", [])]
    index = next((n for n, i in enumerate(instances) if i["instance"] == entry["instance"]), None)
    if entry.get("state") == "stopped":
        if index is not None:
            del instances[index]
    elif index is None:
        instances.append(dict(entry))
    else:
        if "reason" not in entry:
            instances[index].pop("reason", None)
        instances[index].update(entry)
    merged = {**view, "instances": instances, "seq": seq, "time": max(view["time"], change["time"])}
    return merged, seq != view_seq + 1
