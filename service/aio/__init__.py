"""The asyncio client's plumbing on aio-pika: connecting (``connect``) and the wire format (``wire``).

The client itself, ``AsyncPublisher`` and ``apublish``, is ``service.async_client``.
"""
