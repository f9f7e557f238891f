"""One message to publish, and the properties a republished message keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: body and properties as AMQP wants them."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]


#: AMQP properties a republished message keeps. Not ``user_id`` (RabbitMQ refuses a
#: message whose user_id is not the publishing user) and not ``expiration``.
REPUBLISHED_PROPERTIES = (
    "content_type", "content_encoding", "priority", "correlation_id", "reply_to",
    "message_id", "timestamp", "type", "app_id",
)


def republished_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The properties to republish a delivered message with: kept ones, made persistent."""
    kept = {k: v for k, v in properties.items() if k in REPUBLISHED_PROPERTIES and v is not None}
    kept["delivery_mode"] = 2
    return kept
