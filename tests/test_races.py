"""The reconnect and replay races (issue 15), each made to happen every time against real processes.

A race that a quiet machine wins nearly always is lost some day under load; each test here arranges the losing
order on purpose (a publisher stuck in its handshake, a DONE that overtakes chunks, a connection cut mid-job, a
broker away for longer than a send queue holds, an engine that acknowledges a cancel late) and checks that nothing
is lost. tests/race_worker.py is the real worker with the knobs that put its messages in those orders.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import zmq
from stack import Stack, run_until, wait_for

from cosy import protocol as P
from cosy.client import Audio, Client, Completed, Failed, JobSpec, Rejected
from cosy.endpoints import Endpoints

RACE_WORKER = str(Path(__file__).parent / "race_worker.py")
TONE_RATE = 22050
TERMINAL = (Completed, Failed, Rejected)


def tone_samples(text: str) -> int:
    return int(len(text) * 0.02 * TONE_RATE)  # the tone engine: 20 ms of audio per character


def ended(*jobs: str) -> Callable[[list], bool]:
    return lambda events: {e.job for e in events if isinstance(e, TERMINAL)} >= set(jobs)


def completed(events: list, job: str) -> Completed:
    outcome = [e for e in events if isinstance(e, TERMINAL) and e.job == job]
    assert len(outcome) == 1 and isinstance(outcome[0], Completed), outcome
    return outcome[0]


def status(endpoints: Endpoints) -> dict:
    """The broker's status, asked in-process (a `cosy status` process takes most of a second)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoints.front)
    try:
        sock.send_multipart(P.StatusRequest().to_frames())
        assert sock.poll(15_000), "the broker did not answer STATUS"
        reply = P.decode(sock.recv_multipart(), P.BROKER_TO_CLIENT)
        assert isinstance(reply, P.StatusReply)
        return reply.status
    finally:
        sock.close(linger=0)


def start_race_worker(s: Stack, name: str, *args: str) -> object:
    proc = s.spawn_script(RACE_WORKER, "--runtime-dir", str(s.runtime_dir), "--name", name, *args, name=name)
    s.workers[name] = proc
    s.wait_worker(name)
    return proc


class Tarpit:
    """A unix socket at PATH that accepts one connection and never speaks ZMTP: the ZeroMQ peer that connects is
    stuck in its handshake (ZMQ_HANDSHAKE_IVL, 30 s), as one behind a slow or lossy link is. Once it caught that
    peer, the path is free again for the real socket to bind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.caught: list[socket.socket] = []

    def catch_one(self, timeout: float) -> None:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        self.caught.append(conn)
        self.listener.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Tarpit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        for conn in self.caught:
            conn.close()


class UnixProxy:
    """A unix-socket relay in front of a broker socket: ``cut()`` breaks every connection through it, as a network
    blip does; the ZeroMQ peer then reconnects through it on its own."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self.upstream = upstream
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(str(self.upstream))
            with self._lock:
                self.conns += [down, up]
                self.accepted += 1
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            conns, self.conns = self.conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


# --- 1. READY only once the audio path works, after a reconnect too ---------------------------------------------


def test_a_job_right_after_a_broker_restart_gets_its_first_chunk(bare_stack: Stack) -> None:
    """The worker's audio publisher reconnects to the new broker later than its DEALER (here: stuck in a handshake).
    It must not announce READY before the new broker's subscription reached it, or the first job's chunks are
    dropped at the source, where no replay can repair them."""
    s = bare_stack
    s.start_broker("--heartbeat-ms", "1000")  # a 3 s liveness window: the tarpit is in place well before it ends
    s.start_worker("tone", name="t", extra=("--heartbeat-ms", "1000"))
    s.kill(s.broker)
    with Tarpit(s.runtime_dir / "audio-in.sock") as tarpit:
        tarpit.catch_one(10)  # the worker's XPUB reconnected into it
        s.start_broker("--heartbeat-ms", "1000")
        s.wait_worker("t", timeout=30)
        text = "the first job after a restart"
        with Client(s.endpoints) as client:
            client.connect()
            client.submit(JobSpec(text, job="after-restart"))
            events = run_until(client, ended("after-restart"), 40)
    done = completed(events, "after-restart")
    assert done.replayed == 0 and done.samples == tone_samples(text) == done.done.samples


# --- 2. late chunks and the replay buffer -----------------------------------------------------------------------


def test_chunks_that_a_done_overtook_reach_the_client_without_a_replay_buffer(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker("--replay-buffer-mb", "0")
    start_race_worker(s, "late", "--late", "2")  # the last data chunk and the final one leave after the DONE
    text = "l" * 50  # 1 s: 10 chunks and the final one
    with Client(s.endpoints) as client:
        client.connect()
        client.submit(JobSpec(text, job="overtaken"))
        events = run_until(client, ended("overtaken"))
    done = completed(events, "overtaken")
    assert done.samples == tone_samples(text) and done.done.chunks == 11 and done.replayed == 0
    assert "2 chunks sent after the broker counted its DONE" in (s.runtime_dir / "late.log").read_text()


def test_size_eviction_takes_finished_runs_before_a_running_one(bare_stack: Stack, tmp_path: Path) -> None:
    """A long job's replay buffer is the oldest; eight short jobs finish meanwhile and fill the buffer past its size.
    Eviction must take the finished ones and keep the running job's chunks, which its client still needs."""
    s = bare_stack
    s.start_broker("--replay-buffer-mb", "0.5", "--client-timeout", "120")
    gate = tmp_path / "open"
    start_race_worker(s, "gated", "--gate", str(gate), "--capacity", "4")
    long_text = "g" * 100  # 20 chunks; it stops before chunk 3 until the gate opens
    # The long job's client loses chunk 0 and, not reading meanwhile, asks for it only at the end.
    slow = Client(s.endpoints, drop_chunk=lambda h: h.job == "gated-long" and h.seq == 0)
    try:
        slow.connect()
        slow.submit(JobSpec(long_text, job="gated-long"))
        wait_for(lambda: status(s.endpoints)["replay_buffer_bytes"] >= 3 * 4410, 30, "the long job's first chunks")
        with Client(s.endpoints) as fast:
            fast.connect()
            short = [f"short-{i}" for i in range(8)]
            for job in short:
                fast.submit(JobSpec("f" * 100, job=job))  # 88 KB of chunks each: 700 KB in all
            events = run_until(fast, ended(*short))
        assert all(isinstance(e, Completed) for e in events if isinstance(e, TERMINAL))
        assert status(s.endpoints)["running"] == 1
        gate.touch()
        events = run_until(slow, ended("gated-long"))
    finally:
        slow.close()
    done = completed(events, "gated-long")
    assert done.replayed >= 1 and done.samples == tone_samples(long_text)


# --- 3. a client's route survives its reconnect ---------------------------------------------------------------------


def test_a_client_reconnect_between_chunks_and_done_still_completes(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    s.start_worker("tone", name="t", options={"delay_ms": 50})  # 20 chunks, 50 ms apart
    proxy = UnixProxy(s.runtime_dir / "front-relay.sock", s.runtime_dir / "front.sock")
    eps = dataclasses.replace(s.endpoints, front=f"ipc://{proxy.path}")
    text = "r" * 100
    try:
        with Client(eps, ping_s=120) as client:  # no PING to tell the broker its new route before the DONE
            client.connect()
            client.submit(JobSpec(text, job="reconnected"))
            run_until(client, lambda ev: any(isinstance(e, Audio) for e in ev))
            proxy.cut()
            wait_for(lambda: proxy.accepted >= 2, 10, "the client's DEALER to reconnect")
            events = run_until(client, ended("reconnected"), 30)
    finally:
        proxy.close()
    done = completed(events, "reconnected")
    assert done.samples == tone_samples(text)


# --- 4. never block on a send -------------------------------------------------------------------------------------


def test_a_broker_outage_longer_than_the_send_queue_does_not_block_the_client(stack: Stack) -> None:
    s = stack
    s.start_worker("tone", name="t")
    jobs = [f"outage-{i}" for i in range(40)]
    with Client(s.endpoints, sndhwm=8) as client:  # libzmq queues 8 messages for an absent broker, then blocks
        client.connect()
        s.kill(s.broker)
        returned = threading.Event()

        def submit_all() -> None:
            for job in jobs:
                client.submit(JobSpec(f"said during the outage, {job}", job=job))
            for _ in range(20):
                client.poll(0.01)
            returned.set()

        thread = threading.Thread(target=submit_all, daemon=True)
        thread.start()
        blocked = not returned.wait(20)
        s.start_broker()
        thread.join(60)
        assert not blocked, "submit() blocked while the broker was away"
        events = run_until(client, ended(*jobs), 120)
    for job in jobs:
        assert completed(events, job).samples == tone_samples(f"said during the outage, {job}")


# --- 5. each socket closed by the thread that uses it ---------------------------------------------------------------


def test_cancel_then_a_new_job_on_the_same_slot_and_a_stop_mid_job_leave_no_error(stack: Stack) -> None:
    """An engine with threads of its own (CosyVoice's pipeline) may report a cancelled run done a while later:
    after the broker gave the slot to the next job, or after the worker began to stop."""
    s = stack
    worker = start_race_worker(s, "sc", "--slow-cancel", "1.0", "--capacity", "1", "--delay-ms", "50")
    with Client(s.endpoints) as client:
        client.connect()
        client.submit(JobSpec("a" * 20, job="first"))
        completed(run_until(client, ended("first")), "first")
        client.submit(JobSpec("b" * 200, job="cancelled"))
        run_until(client, lambda ev: any(isinstance(e, Audio) and e.job == "cancelled" for e in ev))
        client.cancel("cancelled")
        client.submit(JobSpec("c" * 20, job="same-slot"))
        events = run_until(client, ended("cancelled", "same-slot"))
        assert [e.code for e in events if isinstance(e, Failed)] == [P.CANCELLED]
        assert completed(events, "same-slot").samples == tone_samples("c" * 20)
        client.submit(JobSpec("d" * 200, job="interrupted"))
        run_until(client, lambda ev: any(isinstance(e, Audio) and e.job == "interrupted" for e in ev))
        s.kill(worker, signal.SIGTERM)  # type: ignore[arg-type]
    assert worker.returncode == 0  # type: ignore[attr-defined]
    log = (s.runtime_dir / "sc.log").read_text()
    assert "worker sc stopped" in log
    assert "Traceback" not in log and " ERROR " not in log, log


# --- 6. smaller ones ----------------------------------------------------------------------------------------------


def test_a_worker_unreachable_at_dispatch_gets_one_job_sent_and_the_batch_goes_elsewhere(bare_stack: Stack) -> None:
    """A worker that registered and vanished before its first JOB (READY and the connection's end arrive together):
    the first send fails and requeues all of the batch placed on it; the rest of that batch must not be sent."""
    s = bare_stack
    s.start_broker("--log-level", "DEBUG")  # each failed send is a DEBUG line
    jobs = [f"ghost-{i}" for i in range(3)]
    with Client(s.endpoints) as client:
        client.connect()
        for job in jobs:
            client.submit(JobSpec(f"placed on a ghost, {job}", job=job))
        wait_for(lambda: status(s.endpoints)["queue"]["interactive"] == 3, 20, "the jobs to queue")
        ctx = zmq.Context()
        ghost = ctx.socket(zmq.DEALER)
        ghost.setsockopt(zmq.LINGER, 5000)
        ghost.setsockopt(zmq.ROUTING_ID, b"ghost-worker")
        ghost.connect(s.endpoints.back)
        ghost.send_multipart(P.Heartbeat().to_frames())
        assert ghost.poll(10_000)  # RECONNECT: connected
        assert isinstance(P.decode(ghost.recv_multipart(), P.BROKER_TO_WORKER), P.Reconnect)
        s.broker.send_signal(signal.SIGSTOP)  # the broker reads READY and the connection's end in one go
        try:
            ghost.send_multipart(P.Ready(worker="ghost", engine="tone", model="sine", voices=["tone"],
                                         default_voice="tone", sample_rate=TONE_RATE, device="cpu", capacity=4,
                                         pid=1, host="nowhere").to_frames())
            ghost.close()
            ctx.term()  # READY has left
        finally:
            s.broker.send_signal(signal.SIGCONT)
        s.start_worker("tone", name="t")
        events = run_until(client, ended(*jobs))
    for job in jobs:
        done = completed(events, job)
        assert done.done.worker == "t" and done.samples == tone_samples(f"placed on a ghost, {job}")
    failed_sends = [line for line in (s.runtime_dir / "broker.log").read_text().splitlines()
                    if "could not send to b'ghost-worker'" in line]
    # READY's acknowledgement and at most the first JOB (a loaded broker may drop the ghost at the failed
    # acknowledgement, before placing anything on it); the old dispatch sent all three JOBs after a failure.
    assert 1 <= len(failed_sends) <= 2, failed_sends


def test_a_replay_gone_for_an_abandoned_run_does_not_fail_the_job(bare_stack: Stack) -> None:
    """Attempt 1 has a hole when its worker dies; the broker drops that run's chunks and requeues the job. Its
    REPLAY_GONE concerns a run that will never be the job's: the job must go on to attempt 2, not fail."""
    s = bare_stack
    s.start_broker()
    crashy = s.start_worker("tone", name="crashy", options={"crash_on": "CRASH", "crash_after": 5, "delay_ms": 20})
    text = "CRASH " + "x" * 60
    client = Client(s.endpoints, drop_chunk=lambda h: h.attempt == 1 and h.seq == 1)
    try:
        client.connect()
        client.submit(JobSpec(text, job="abandoned"))
        assert crashy.wait(30) == 137
        wait_for(lambda: (lambda st: st["counters"]["retried"] == 1 and st["replay_buffer_bytes"] == 0)(
            status(s.endpoints)), 30, "the broker to requeue the job and drop attempt 1's chunks")
        s.start_worker("tone", name="fine", wait=False)  # the client reads attempt 1's hole before it registers
        events = run_until(client, ended("abandoned"), 60)
    finally:
        client.close()
    done = completed(events, "abandoned")
    assert done.done.attempt == 2 and done.done.worker == "fine" and done.samples == tone_samples(text)


def test_wyoming_finishes_the_synthesis_in_flight_on_sigterm_then_exits_0(bare_stack: Stack) -> None:
    import asyncio

    import pytest

    pytest.importorskip("wyoming")
    from test_http_gateway import GatewayProcess
    from wyoming.audio import AudioChunk, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize

    s = bare_stack
    s.start_broker()
    s.start_worker("tone", name="t", options={"delay_ms": 50})  # 2 s of audio in 1 s
    gw = GatewayProcess(s, "wyoming", []).start()
    text = "w" * 100

    async def synthesize_and_stop_the_gateway() -> tuple[int, bool]:
        client = AsyncTcpClient("127.0.0.1", gw.port)
        await client.connect()
        await client.write_event(Synthesize(text=text).event())
        samples, stopped = 0, False
        while (event := await asyncio.wait_for(client.read_event(), 30)) is not None:
            if AudioChunk.is_type(event.type):
                if samples == 0:
                    gw.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                samples += len(AudioChunk.from_event(event).audio) // 2
            elif AudioStop.is_type(event.type):
                stopped = True
                break
        await client.disconnect()
        return samples, stopped

    samples, stopped = asyncio.run(synthesize_and_stop_the_gateway())
    assert stopped and samples == tone_samples(text)
    assert gw.proc.wait(20) == 0  # type: ignore[union-attr]
    log = s.log_text()
    assert "Traceback" not in log, log


def test_the_stack_leaves_no_log_file_open() -> None:
    import gc
    import warnings

    s = Stack()
    gc.collect()  # what earlier tests left for the collector is not this test's business
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            proc = s.spawn("--help", name="help")
            assert proc.wait(60) == 0
            gc.collect()
    finally:
        s.stop()
    leaks = [str(w.message) for w in caught
             if issubclass(w.category, ResourceWarning) and str(s.runtime_dir) in str(w.message)]
    assert not leaks, leaks


# --- 7. a worker's figures in `cosy status` -------------------------------------------------------------------------


def test_a_workers_ttfc_and_rtf_are_known_at_done_and_none_before(bare_stack: Stack) -> None:
    s = bare_stack
    # Heartbeats 10 s apart: what the status shows right after the DONE cannot have come from a heartbeat.
    s.start_broker("--heartbeat-ms", "10000")
    s.start_worker("tone", name="t", extra=("--heartbeat-ms", "10000"))
    (before,) = status(s.endpoints)["workers"]
    assert before["metrics"]["mean_ttfc_ms"] is None and before["metrics"]["mean_rtf"] is None
    with Client(s.endpoints) as client:
        client.connect()
        client.submit(JobSpec("figures", job="figures"))
        done = completed(run_until(client, ended("figures")), "figures").done
    (after,) = status(s.endpoints)["workers"]
    assert after["jobs_done"] == 1 and after["metrics"]["jobs_done"] == 1
    assert after["metrics"]["mean_ttfc_ms"] == round(done.ttfc_ms, 2)
    assert after["metrics"]["mean_rtf"] == round(done.rtf, 4)
