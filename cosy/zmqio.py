"""Hot-path socket I/O: whole multipart messages as zmq.Frame objects, without pyzmq's per-call sugar.

pyzmq's ``recv_multipart``/``send_multipart`` ask libzmq for RCVMORE through the option-name layer and
combine enum flags on every part; on a chunk forwarded by the broker that was about half of its Python
cost (`cosy bench throughput`). These helpers use ``Frame.more`` and plain int flags instead. Both are
non-blocking: ``recv_frames`` raises ``zmq.Again`` when nothing is queued, ``send_frames`` when the peer's
queue is full (libzmq queues a multipart message atomically, so that happens on the first part only).

``try_send`` is the one way a client or a worker sends a control message on its DEALER: never blocking (a DEALER
whose broker is away queues ``SNDHWM`` messages, then a blocking send would wait for the broker), it says whether
the message was queued and leaves the caller to keep or drop what was not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

NOBLOCK = int(zmq.NOBLOCK)
NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """The next whole message, without copying its parts; raises zmq.Again if there is none."""
    frame = sock.recv(NOBLOCK, copy=False)
    parts = [frame]
    while frame.more:
        frame = sock.recv(NOBLOCK, copy=False)
        parts.append(frame)
    return parts


def send_frames(sock: zmq.Socket, parts: Sequence[Any]) -> None:
    """Queue a message made of Frames or buffers without copying; raises zmq.Again if the queue is full."""
    last = len(parts) - 1
    send = sock.send
    for i, part in enumerate(parts):
        send(part, NOBLOCK if i == last else NOBLOCK_MORE, copy=False)


def try_send(sock: zmq.Socket, frames: Sequence[Any]) -> bool:
    """Queue a whole message without blocking; False (nothing queued) when the socket's queue is full."""
    try:
        sock.send_multipart(frames, NOBLOCK)
    except zmq.Again:
        return False
    return True
