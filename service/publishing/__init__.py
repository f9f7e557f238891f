"""Confirmed, mandatory publishing: what the client, the worker and the tools use to put messages on the broker.

``ConfirmedChannel`` (service.publishing.channel) keeps one connection with one
confirm-mode channel and lets many threads keep messages in flight on it at
once; each caller returns only once the broker confirmed its own messages.
``Inflight`` (service.publishing.inflight) is the book-keeping of delivery
tags, acks, nacks and returns behind it; ``Outgoing`` (service.publishing.message)
is one message as AMQP wants it.
"""

from service.publishing.channel import ConfirmedChannel
from service.publishing.message import REPUBLISHED_PROPERTIES, Outgoing, republished_properties

__all__ = ["REPUBLISHED_PROPERTIES", "ConfirmedChannel", "Outgoing", "republished_properties"]
