"""Message properties for aiormq that put a message on the wire as the sync client (py-amqp) does."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from aiormq import spec
from pamqp import encode

__all__ = ["Properties"]


class Properties(spec.Basic.Properties):
    """pamqp's message properties, except that header floats go as 64-bit doubles, as py-amqp sends them.

    pamqp 4 encodes every float in a header table as a 32-bit float (7 digits):
    an epoch time such as kit-enqueued-at would lose its seconds. Tuples go as
    arrays, like lists. (pamqp also never sends an empty string property, so an
    empty ``reply_to`` is absent rather than "".)
    """

    def encode_property(self, name: str, value: Any) -> bytes:
        """The property encoded, with ``headers`` through the kit's table encoder."""
        return _table(value) if name == "headers" else super().encode_property(name, value)


def _table(table: Mapping[str, Any]) -> bytes:
    data = b"".join(encode.short_string(key) + _value(value) for key, value in sorted(table.items()))
    return struct.pack(">I", len(data)) + data


def _value(value: Any) -> bytes:
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, Mapping):
        return b"F" + _table(value)
    if isinstance(value, list | tuple):
        data = b"".join(_value(item) for item in value)
        return b"A" + struct.pack(">I", len(data)) + data
    return encode.encode_table_value(value)
