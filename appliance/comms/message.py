"""What comms delivers reliably: an outbound message, and the durable outbox it is read from.

The outbox is a table of the scene journal (a result is written in the same transaction
that marks its scene done), so comms sees it only through the ``Outbox`` protocol: the
transport knows rows to deliver, never scenes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Message:
    """One outbox row: a message to deliver at least once."""

    msg_id: str
    topic: str
    payload: str
    qos: int = 1
    retain: bool = False


class Outbox(Protocol):
    """Durable messages awaiting the broker's acknowledgement."""

    def enqueue(self, message: Message) -> bool: ...

    def pending(self, limit: int = 100, exclude: set[str] | frozenset[str] = frozenset()
                ) -> Iterable[Message]: ...

    def acknowledge(self, *msg_ids: str) -> None: ...

    def outbox_depth(self) -> int: ...
