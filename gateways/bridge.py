"""One broker client shared by every request of an asyncio gateway.

ZeroMQ sockets must stay in the thread that uses them, and an HTTP or Wyoming server serves
many requests at once on one event loop. So a :class:`BrokerBridge` owns a thread that owns
the :class:`cosy.client.Client` (its DEALER and SUB) and a DEALER for status requests. The
event loop talks to that thread through a command queue plus a self-pipe that wakes the
thread's poller at once; the thread hands each job's events back to the job's own
``asyncio.Queue`` with ``loop.call_soon_threadsafe``. Nothing but the bridge thread touches a
ZeroMQ socket; both of its sockets to the broker's front (jobs and status) get the client's
CURVE keys when the endpoints are secure. The thread never blocks on a send, however long the
broker is away: the client keeps what its DEALER's queue cannot take (see cosy.client), and a
status request that does not fit is skipped.

Gateways do not read a :class:`JobHandle` themselves: :mod:`cosy.gateways.jobstream` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from cosy import protocol as P
from cosy.client import (
    BrokerRestarted,
    Client,
    Completed,
    Event,
    Failed,
    JobSpec,
    Rejected,
)
from cosy.endpoints import Endpoints
from cosy.security import prepare_client

log = logging.getLogger("cosy.gateway")

STATUS_EVERY_S = 1.0  # background refresh of the broker's status (voices, workers, queue)
STATUS_TIMEOUT_S = 3.0
BROKER_SILENT_S = 3.5  # no PONG for this long: the broker counts as unreachable
TERMINAL = (Rejected, Completed, Failed)


BROKER_UNREACHABLE = "BROKER_UNREACHABLE"
GATEWAY_STOPPED = "GATEWAY_STOPPED"


class GatewayError(RuntimeError):
    """The bridge cannot serve a request: ``code`` is BROKER_UNREACHABLE or GATEWAY_STOPPED."""

    def __init__(self, message: str, code: str = BROKER_UNREACHABLE) -> None:
        super().__init__(message)
        self.code = code


class JobEvents:
    """What a gateway reads of a job, one job or several as one (:class:`~cosy.gateways.segments.SegmentedJob`):
    its events in order through :meth:`next_event`, and one :meth:`cancel`.

    ``finished`` becomes true in exactly two places: when :meth:`next_event` hands out the terminal event
    (Completed, Failed or Rejected), or when :meth:`cancel` stops the job.
    """

    job: str
    events: asyncio.Queue[Event]
    finished: bool

    async def next_event(self, timeout_s: float | None = None) -> Event:
        """The next event; raises asyncio.TimeoutError after ``timeout_s`` without one."""
        ev = await asyncio.wait_for(self.events.get(), timeout_s)
        if isinstance(ev, TERMINAL):
            self.finished = True
        return ev

    def cancel(self) -> bool:
        """Stop the job if it has not ended; True when it was still live (so it was stopped now)."""
        if self.finished:
            return False
        self.finished = True
        self._stop()
        return True

    def _stop(self) -> None:
        raise NotImplementedError


@dataclass(eq=False)  # hashable by identity: sets of open jobs
class JobHandle(JobEvents):
    """The asyncio side of one job on the broker: its events arrive on ``events`` in order."""

    job: str
    spec: JobSpec
    loop: asyncio.AbstractEventLoop
    stop_job: Callable[[str], None] = field(repr=False, default=lambda job: None)  # the bridge's cancel
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False

    def _stop(self) -> None:
        self.stop_job(self.job)


@dataclass
class StatusSnapshot:
    status: dict[str, Any] | None
    at: float  # time.monotonic() when it arrived; 0.0 if never

    @property
    def voices(self) -> list[str]:
        return list(self.status.get("voices", [])) if self.status else []

    @property
    def workers(self) -> list[dict[str, Any]]:
        return list(self.status.get("workers", [])) if self.status else []

    def default_voice(self) -> str | None:
        for w in self.workers:
            if w.get("default_voice"):
                return str(w["default_voice"])
        return None


class BrokerBridge:
    """Thread-owned broker client. Start it, then use it from any asyncio loop."""

    def __init__(self, endpoints: Endpoints, ctx: zmq.Context | None = None,
                 status_every_s: float = STATUS_EVERY_S) -> None:
        self.endpoints = endpoints
        self.ctx = ctx or zmq.Context.instance()
        self.status_every_s = status_every_s
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._handles: dict[str, JobHandle] = {}  # touched only by the bridge thread
        self._status = StatusSnapshot(None, 0.0)
        self._status_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[StatusSnapshot]]] = []
        self._status_sent = 0.0
        self._last_pong = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cosy-broker-bridge", daemon=True)
        self._started = threading.Event()

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Cancel every job still open, then stop the thread."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout_s)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # --- what the event loop calls ----------------------------------------------------

    @property
    def broker_up(self) -> bool:
        return bool(self._last_pong) and time.monotonic() - self._last_pong < BROKER_SILENT_S

    def submit(self, spec: JobSpec) -> JobHandle:
        """Submit a job; its events (Accepted, Started, Audio..., Completed or Rejected/Failed) follow."""
        self._check_running()
        handle = JobHandle(spec.job, spec, asyncio.get_running_loop(), self._cancel_job)
        self._call(lambda: self._do_submit(handle))
        return handle

    def _cancel_job(self, job: str) -> None:
        """JobHandle.cancel(): tell the broker (a client went away, or the gateway gave up on the job)."""
        if not self._stop.is_set():
            self._call(lambda: self._do_cancel(job))

    def snapshot(self) -> StatusSnapshot:
        return self._status

    async def status(self, max_age_s: float = STATUS_EVERY_S * 2) -> StatusSnapshot:
        """The broker's status, at most ``max_age_s`` old; raises GatewayError if it does not answer."""
        snap = self._status
        if snap.status is not None and time.monotonic() - snap.at <= max_age_s:
            return snap
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StatusSnapshot] = loop.create_future()
        self._call(lambda: self._want_status(loop, fut))
        try:
            return await asyncio.wait_for(fut, STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise GatewayError(f"the broker at {self.endpoints.front} did not answer") from None

    # --- plumbing between threads -------------------------------------------------------

    def _check_running(self) -> None:
        if self._stop.is_set() or not self._thread.is_alive():
            raise GatewayError("the gateway is stopping", GATEWAY_STOPPED)

    def _call(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the thread will wake anyway) or closed

    # --- the bridge thread ----------------------------------------------------------------

    def _run(self) -> None:
        client = Client(self.endpoints, self.ctx, client_id=f"gw-{os.getpid()}-{os.urandom(4).hex()}")
        status_sock = self.ctx.socket(zmq.DEALER)
        status_sock.setsockopt(zmq.LINGER, 0)
        prepare_client(status_sock, self.endpoints.curve_dir if self.endpoints.secure else None)
        status_sock.connect(self.endpoints.front)
        poller = zmq.Poller()
        poller.register(client.dealer, zmq.POLLIN)
        poller.register(client.sub, zmq.POLLIN)
        poller.register(status_sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._client = client
        self._started.set()
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if self._wake_r in ready:
                    self._drain_wake()
                self._run_commands()
                for ev in client.poll(0):
                    self._dispatch(ev)
                if client.last_pong > self._last_pong:
                    self._last_pong = client.last_pong
                if status_sock in ready:
                    self._read_status(status_sock)
                self._maybe_ask_status(status_sock)
        except Exception:  # pragma: no cover - a bug here must be loud, and fail every open request
            log.exception("the broker bridge stopped on an error")
        finally:
            for handle in list(self._handles.values()):  # none of them has ended (that removes it)
                client.cancel(handle.job)
                self._deliver(handle, Failed(handle.job, GATEWAY_STOPPED, "the gateway is stopping"))
            self._handles.clear()
            self._fail_status_waiters()
            status_sock.close(linger=0)
            # Let the CANCELs leave before the sockets go.
            client.dealer.setsockopt(zmq.LINGER, 200)
            client.close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _do_submit(self, handle: JobHandle) -> None:
        self._handles[handle.job] = handle
        try:
            self._client.submit(handle.spec)
        except P.ProtocolError as exc:
            self._handles.pop(handle.job, None)
            self._deliver(handle, Rejected(handle.job, P.BAD_REQUEST, str(exc), []))

    def _do_cancel(self, job: str) -> None:
        if self._handles.pop(job, None) is not None:
            self._client.cancel(job)
            self._client.forget(job)

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, BrokerRestarted):
            for handle in self._handles.values():
                self._deliver(handle, ev)
            return
        handle = self._handles.get(ev.job)
        if handle is None:
            return
        if isinstance(ev, TERMINAL):
            del self._handles[ev.job]
        self._deliver(handle, ev)

    @staticmethod
    def _deliver(handle: JobHandle, ev: Event) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, ev)
        except RuntimeError:
            pass  # that event loop is closed: nobody is listening any more

    # --- status -------------------------------------------------------------------------

    def _want_status(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[StatusSnapshot]) -> None:
        self._status_waiters.append((loop, fut))
        self._status_sent = 0.0  # ask now

    def _maybe_ask_status(self, sock: zmq.Socket) -> None:
        """Ask every status_every_s, and at once (then every 0.5 s) while a request waits for it."""
        now = time.monotonic()
        interval = 0.5 if self._status_waiters else self.status_every_s
        if now - self._status_sent < interval:
            return
        self._status_sent = now
        try:
            sock.send_multipart(P.StatusRequest().to_frames(), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _read_status(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames, P.BROKER_TO_CLIENT)
            except P.ProtocolError as exc:
                log.warning("bad status reply: %s", exc)
                continue
            if not isinstance(msg, P.StatusReply):
                continue
            self._status = StatusSnapshot(msg.status, time.monotonic())
            self._last_pong = max(self._last_pong, self._status.at)
            waiters, self._status_waiters = self._status_waiters, []
            for loop, fut in waiters:
                self._resolve(loop, fut, self._status)

    def _fail_status_waiters(self) -> None:
        waiters, self._status_waiters = self._status_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_exception, fut, GatewayError("the gateway is stopping", GATEWAY_STOPPED))
            except RuntimeError:
                pass

    @staticmethod
    def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[StatusSnapshot], snap: StatusSnapshot) -> None:
        try:
            loop.call_soon_threadsafe(_set_result, fut, snap)
        except RuntimeError:
            pass


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
