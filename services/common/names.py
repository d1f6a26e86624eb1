"""Names derived from others, built in one place so every component agrees on them."""

from __future__ import annotations


def instance_id(service: str, epoch: int) -> str:
    """The id of a service's instance at ``epoch`` (a new one for every placement)."""
    return f"{service}.{epoch}"


def epoch_of(instance: str) -> int:
    """The epoch an instance id was made for (0 if it was not made by ``instance_id``)."""
    _, _, tail = instance.rpartition(".")
    return int(tail) if tail.isdigit() else 0
