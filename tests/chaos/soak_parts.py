"""The chaos soak's moving parts (tests/chaos/test_soak.py): the load, the faults, the observers.

- Load: ``cosy say`` processes every few seconds (:class:`SayLoad`) and a thread pool of OpenAI speech
  requests to ``cosy http`` (:class:`HttpLoad`); the 3,000-line ``cosy batch`` is started by the test.
- Faults (:class:`FaultInjector`): kill -9 a worker and start it again (as systemd would), SIGSTOP a
  worker past its liveness window then SIGCONT it, SIGKILL the broker and start it again, kill a
  ``cosy say`` mid-stream, and drop a burst of chunks on one client (a stalled SUB with a low RCVHWM
  against the broker's lowered ``--audio-hwm``: real ZeroMQ high-water-mark drops, no test hook) so
  its gap repair has to fetch them from the broker's replay buffer.
- Observers: RSS of every long-lived process per lifetime (:class:`RssSampler`), the batch's output
  files' inodes and mtimes (:class:`OutputWatcher`).

Every outcome is an :class:`Outcome` with ``ok`` saying whether it is allowed by the documented
contract; every fault a :class:`Fault` with its time, so a failure can be replayed from the seed.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
import zmq
from stack import Stack, wait_for

from cosy import protocol as P
from cosy.client import Client, Completed, Failed, JobSpec, Rejected

SAY_EXITS = {1: "job failed", 3: "broker unreachable", 4: "busy or timed out"}  # README.md "Exit codes"
HTTP_ERRORS = {500, 502, 503, 504}  # docs/gateways.md "Errors": what a valid request may get under faults
# Piper's joe voice speaks about 0.06 s per character of English; anything far outside is not plausible.
SECONDS_PER_CHAR = (0.02, 0.25)

SENTENCES = [
    "The kettle is on.",
    "Please close the kitchen window before it rains.",
    "Seven boxes arrived this morning, and two of them were empty.",
    "Turn left at the bakery.",
    "The train to the coast leaves at half past nine.",
    "She painted the fence blue, then changed her mind.",
    "Dinner is ready.",
    "A quiet voice carried across the empty hall.",
    "Remember to water the tomatoes on Sunday.",
    "The meeting moved to Thursday afternoon.",
]
LONG_TEXT = " ".join(SENTENCES)  # about 22 s of speech in ~25 chunks: long enough to be mid-stream when killed
DROP_TEXT = " ".join([LONG_TEXT] * 2)  # ~50 chunks: more than a stalled client's RCVHWM + the broker's --audio-hwm
DROP_CHUNKS = 20  # streamed during the stall; --audio-hwm 4, RCVHWM 2 and the socket buffers hold about 10
STALL_MAX_S = 20.0  # under the soak broker's --client-timeout (30 s)


def rss_kb(pid: int) -> int | None:
    """The resident set of a process from /proc, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def plausible(samples: int, rate: int, text: str) -> bool:
    seconds = samples / rate if rate else 0.0
    return SECONDS_PER_CHAR[0] * len(text) <= seconds <= SECONDS_PER_CHAR[1] * len(text) + 1.0


# --- records --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the load and how it ended."""

    kind: str  # say, http, say_victim, drop
    outcome: str  # completed, failed, killed, aborted, hung, invalid
    code: str  # exit code, HTTP status or error code
    t_s: float  # start, seconds since the soak began
    seconds: float
    ok: bool  # allowed by the documented contract
    detail: str = ""


@dataclass
class Fault:
    kind: str
    t_s: float  # when it was injected, seconds since the soak began
    target: str
    detail: str = ""
    effective: bool = True  # the fault did what it is for (e.g. chunks really were dropped)
    seconds: float = 0.0


@dataclass
class Lifetime:
    role: str  # broker, worker, gateway
    name: str
    proc: subprocess.Popen
    started_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the soak began, kB)
    ended_s: float | None = None


# --- observers ------------------------------------------------------------------------------------------


class _Periodic:
    """A thread that calls ``tick()`` every ``interval_s`` until ``stop()``, which ticks once more."""

    def __init__(self, interval_s: float, name: str, join_s: float) -> None:
        self.interval_s = interval_s
        self._join_s = join_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._join_s)
        self.tick()


class RssSampler(_Periodic):
    """VmRSS of every tracked process every ``interval_s``, one series per process lifetime."""

    def __init__(self, t0: float, interval_s: float = 3.0) -> None:
        super().__init__(interval_s, "rss", join_s=10)
        self.t0 = t0
        self.lifetimes: list[Lifetime] = []
        self._lock = threading.Lock()

    def track(self, role: str, name: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self.lifetimes.append(Lifetime(role, name, proc, time.monotonic() - self.t0))
        self.sample()

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        with self._lock:
            for life in self.lifetimes:
                if life.ended_s is not None:
                    continue
                kb = rss_kb(life.proc.pid) if life.proc.poll() is None else None
                if kb is None:
                    life.ended_s = now
                else:
                    life.samples.append((round(now, 1), kb))

    tick = sample


class OutputWatcher(_Periodic):
    """Inode, mtime and size of every output file, first seen and on each scan: a rewrite shows."""

    def __init__(self, folder: Path, interval_s: float = 5.0) -> None:
        super().__init__(interval_s, "outputs", join_s=30)
        self.folder = folder
        self.seen: dict[str, tuple[int, int, int]] = {}
        self.changed: list[str] = []

    def scan(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.wav"):
            try:
                st = path.stat()
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            old = self.seen.setdefault(path.name, key)
            if old != key and path.name not in self.changed:
                self.changed.append(path.name)

    tick = scan


# --- load -----------------------------------------------------------------------------------------------


def cosy_popen(s: Stack, args: list[str], stdout: Any, stderr: Any) -> subprocess.Popen:
    """A `cosy` command against the stack, stopped by PID with the rest of it whatever happens."""
    proc = subprocess.Popen([sys.executable, "-m", "cosy", *args, "--runtime-dir", str(s.runtime_dir)],
                            env=s.env, stdout=stdout, stderr=stderr)
    s.procs.append(proc)
    return proc


def check_file(path: Path, text: str) -> str:
    """Empty if ``path`` is a decodable audio file of plausible length for ``text``, else what is wrong."""
    try:
        audio, rate = sf.read(str(path), dtype="int16")
    except Exception as exc:  # soundfile raises its own and RuntimeError
        return f"not decodable: {exc}"
    if not plausible(len(audio), rate, text):
        return f"{len(audio) / rate:.2f} s of audio for {len(text)} characters"
    return ""


@dataclass
class _Say:
    proc: subprocess.Popen
    out: Path
    text: str
    t_s: float
    started: float
    err: Path


class SayLoad:
    """`cosy say TEXT --out FILE --no-play` every few seconds; each must end within its timeout."""

    def __init__(self, s: Stack, folder: Path, rng: random.Random, t0: float, record: Callable[[Outcome], None],
                 every_s: tuple[float, float] = (2.0, 5.0), timeout_s: float = 60.0, grace_s: float = 30.0) -> None:
        self.s, self.folder, self.rng, self.t0, self.record = s, folder, rng, t0, record
        self.every_s, self.timeout_s, self.grace_s = every_s, timeout_s, grace_s
        self.running: list[_Say] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="say", daemon=True)
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self._thread.start()

    def _launch(self) -> None:
        self.count += 1
        text = " ".join(self.rng.sample(SENTENCES, self.rng.randint(1, 2)))
        out = self.folder / f"say-{self.count:04d}.wav"
        err = self.folder / f"say-{self.count:04d}.err"
        with open(err, "wb") as stderr:
            proc = cosy_popen(self.s, ["say", text, "--out", str(out), "--no-play", "--timeout",
                                       f"{self.timeout_s:g}"], subprocess.DEVNULL, stderr)
        now = time.monotonic()
        self.running.append(_Say(proc, out, text, now - self.t0, now, err))

    def _reap(self) -> None:
        now = time.monotonic()
        for say in list(self.running):
            rc = say.proc.poll()
            took = now - say.started
            if rc is None and took <= self.timeout_s + self.grace_s:
                continue
            self.running.remove(say)
            if rc is None:  # hung past its own --timeout
                say.proc.kill()
                say.proc.wait(10)
                self.record(Outcome("say", "hung", "-", say.t_s, took, False, f"still running after {took:.0f} s"))
                continue
            stderr = say.err.read_text(errors="replace").strip()
            last = stderr.splitlines()[-1] if stderr else ""
            if "Traceback" in stderr:
                self.record(Outcome("say", "invalid", str(rc), say.t_s, took, False, f"traceback: {stderr[-400:]}"))
            elif rc == 0:
                problem = check_file(say.out, say.text) if say.out.exists() else "exit 0 without the file"
                self.record(Outcome("say", "invalid" if problem else "completed", "0", say.t_s, took, not problem,
                                    problem))
            elif rc in SAY_EXITS:
                leftover = say.out.exists()
                self.record(Outcome("say", "failed", str(rc), say.t_s, took, not leftover,
                                    last + (" (and left a file behind)" if leftover else "")))
            else:
                self.record(Outcome("say", "invalid", str(rc), say.t_s, took, False, f"undocumented exit: {last}"))

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_at:
                self._launch()
                next_at = time.monotonic() + self.rng.uniform(*self.every_s)
            self._reap()
            self._stop.wait(0.2)

    def finish(self) -> None:
        """Stop launching; wait (bounded by each one's timeout) for those running."""
        self._stop.set()
        self._thread.join(30)
        wait_for(lambda: (self._reap(), not self.running)[1], self.timeout_s + self.grace_s + 10,
                 "the last `cosy say` commands", interval=0.2)


class HttpLoad:
    """A thread pool posting OpenAI speech requests (wav) to `cosy http`, each bounded by a client timeout."""

    def __init__(self, url: str, rng_seed: int, t0: float, record: Callable[[Outcome], None], threads: int = 3,
                 pause_s: tuple[float, float] = (1.0, 4.0), timeout_s: float = 90.0) -> None:
        self.url, self.rng_seed, self.t0, self.record = url, rng_seed, t0, record
        self.threads, self.pause_s, self.timeout_s = threads, pause_s, timeout_s
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="http")
        self._futures: list[Any] = []

    def start(self) -> None:
        self._futures = [self._pool.submit(self._loop, i) for i in range(self.threads)]

    def _loop(self, index: int) -> None:
        import httpx

        rng = random.Random(self.rng_seed + index)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        with httpx.Client(timeout=timeout) as http:
            while not self._stop.is_set():
                text = " ".join(rng.sample(SENTENCES, rng.randint(1, 2)))
                self.record(self.one(http, text))
                self._stop.wait(rng.uniform(*self.pause_s))

    def one(self, http: Any, text: str) -> Outcome:
        import httpx

        t = time.monotonic()
        start = t - self.t0
        body = {"model": "tts-1", "input": text, "voice": "joe", "response_format": "wav"}
        try:
            with http.stream("POST", f"{self.url}/v1/audio/speech", json=body) as resp:
                data = resp.read()
                status = resp.status_code
        except httpx.TimeoutException as exc:
            return Outcome("http", "hung", "timeout", start, time.monotonic() - t, False, repr(exc))
        except httpx.RemoteProtocolError as exc:
            # docs/gateways.md: what fails after the first audio aborts the response without its final chunk.
            return Outcome("http", "aborted", "200", start, time.monotonic() - t, True, str(exc)[:200])
        except httpx.TransportError as exc:
            return Outcome("http", "invalid", "transport", start, time.monotonic() - t, False, repr(exc))
        took = time.monotonic() - t
        if status == 200:
            try:
                audio, rate = sf.read(io.BytesIO(data), dtype="int16")
            except Exception as exc:
                return Outcome("http", "invalid", "200", start, took, False, f"not decodable: {exc}")
            if not plausible(len(audio), rate, text):
                return Outcome("http", "invalid", "200", start, took, False,
                               f"{len(audio) / rate:.2f} s of audio for {len(text)} characters")
            return Outcome("http", "completed", "200", start, took, True)
        try:
            code = json.loads(data)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return Outcome("http", "failed", str(status), start, took, status in HTTP_ERRORS and code != "?",
                       f"{code}: {data[:200].decode(errors='replace')}")

    def finish(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=self.timeout_s + 30)  # re-raises a bug in the load itself
        self._pool.shutdown(wait=True)


# --- faults ---------------------------------------------------------------------------------------------

KINDS = ("worker_kill", "worker_stop", "broker_kill", "say_kill", "chunk_drop")
WEIGHTS = (3, 3, 1, 2, 2)  # beyond the two of each: broker kills are the heaviest, keep them rarer


def plan_faults(rng: random.Random, soak_s: float, every_s: float = 10.0) -> list[tuple[float, str]]:
    """(when, kind) for the whole soak: at least 20 faults, each kind at least twice, about one every ``every_s``."""
    n = max(20, round(soak_s / every_s))
    kinds = [k for k in KINDS for _ in range(2)] + rng.choices(KINDS, WEIGHTS, k=n - 2 * len(KINDS))
    rng.shuffle(kinds)
    slot = soak_s / n
    return [(round((i + rng.uniform(0.2, 0.8)) * slot, 1), kind) for i, kind in enumerate(kinds)]


class FaultInjector:
    """Injects one fault at a time into the stack, and brings back what it broke, as systemd would."""

    def __init__(self, s: Stack, rng: random.Random, t0: float, rss: RssSampler, broker_args: tuple[str, ...],
                 worker_options: dict[str, Any], worker_names: list[str], record: Callable[[Outcome], None],
                 violation: Callable[[str], None], folder: Path) -> None:
        self.s, self.rng, self.t0, self.rss = s, rng, t0, rss
        self.broker_args, self.worker_options, self.worker_names = broker_args, worker_options, worker_names
        self.record, self.violation, self.folder = record, violation, folder
        self.faults: list[Fault] = []
        self.broker_lifetimes: list[dict[str, Any]] = []  # the counters of each broker, just before its kill
        self.stopped: set[int] = set()
        self._victims = 0
        folder.mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def log(self, fault: Fault) -> None:
        self.faults.append(fault)
        print(f"soak: t={fault.t_s:7.1f} s  {fault.kind:<11} {fault.target:<10} {fault.detail}", flush=True)

    def status(self) -> dict[str, Any] | None:
        """`cosy status --json`, or None while the broker does not answer."""
        try:
            return self.s.status()
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            return None

    def quick_status(self) -> dict[str, Any] | None:
        """The same status, asked from this process (for polling: no Python start-up per call)."""
        from cosy.cli.status import fetch_status

        try:
            return fetch_status(self.s.endpoints, timeout_s=5.0)
        except SystemExit:  # fetch_status exits 3 with a message when the broker does not answer
            return None

    def workers(self) -> dict[str, dict[str, Any]]:
        st = self.quick_status()
        return {w["name"]: w for w in st["workers"]} if st else {}

    def wait_registered(self, name: str, pid: int, timeout: float = 90) -> bool:
        try:
            wait_for(lambda: self.workers().get(name, {}).get("pid") == pid, timeout,
                     f"worker {name} (pid {pid}) registered", interval=0.2)
            return True
        except TimeoutError:
            return False

    def pick_worker(self) -> str:
        busy = sorted(n for n, w in self.workers().items() if w["running"])
        return self.rng.choice(busy or self.worker_names)

    def run(self, kind: str) -> None:
        t = time.monotonic()
        fault = getattr(self, kind)()
        fault.seconds = round(time.monotonic() - t, 2)
        self.log(fault)

    # --- the kinds --------------------------------------------------------------------------------

    def worker_kill(self) -> Fault:
        name = self.pick_worker()
        at = self.now()
        old = self.s.workers[name]
        self.s.kill(old, signal.SIGKILL)
        proc = self.s.start_worker("piper", name=name, options=self.worker_options, wait=False)
        self.rss.track("worker", name, proc)
        back = self.wait_registered(name, proc.pid)
        if not back:
            self.violation(f"worker_kill at {at} s: the restarted {name} (pid {proc.pid}) did not register in 90 s")
        return Fault("worker_kill", at, name, f"kill -9 pid {old.pid}; restarted as pid {proc.pid}", back)

    def worker_stop(self) -> Fault:
        name = self.pick_worker()
        proc = self.s.workers[name]
        at = self.now()
        os.kill(proc.pid, signal.SIGSTOP)
        self.stopped.add(proc.pid)
        t = time.monotonic()
        try:  # past the liveness window (3 x 200 ms): the broker declares it dead and requeues its jobs
            wait_for(lambda: self.quick_status() is not None and name not in self.workers(), 30,
                     f"the broker to declare {name} dead", interval=0.2)
            dropped = True
        except TimeoutError:
            dropped = False
        time.sleep(self.rng.uniform(0.5, 2.0))  # the fault's own length: stay frozen a while longer
        os.kill(proc.pid, signal.SIGCONT)
        self.stopped.discard(proc.pid)
        frozen = time.monotonic() - t
        back = self.wait_registered(name, proc.pid)
        if not dropped:
            self.violation(f"worker_stop at {at} s: {name} was frozen {frozen:.1f} s but the broker kept it")
        if not back:
            self.violation(f"worker_stop at {at} s: {name} (pid {proc.pid}) did not register again within 90 s "
                           "of SIGCONT")
        return Fault("worker_stop", at, name, f"SIGSTOP pid {proc.pid} for {frozen:.1f} s, then SIGCONT",
                     dropped and back)

    def broker_kill(self) -> Fault:
        st = self.status()
        at = self.now()
        assert self.s.broker is not None
        old = self.s.broker
        self.s.kill(old, signal.SIGKILL)
        if st is not None:
            self.broker_lifetimes.append({"pid": old.pid, "ended_s": at, "status": st})
        else:
            self.violation(f"broker_kill at {at} s: the broker did not answer `cosy status` just before")
        proc = self.s.start_broker(*self.broker_args)
        self.rss.track("broker", "broker", proc)
        old_epoch = st["broker"]["epoch"] if st else ""

        def all_back() -> bool:
            now = self.quick_status()
            return bool(now and now["broker"]["epoch"] != old_epoch
                        and set(self.worker_names) <= {w["name"] for w in now["workers"]})

        try:
            wait_for(all_back, 90, "the new broker with every worker registered", interval=0.2)
            back = True
        except TimeoutError:
            back = False
            self.violation(f"broker_kill at {at} s: the workers did not all register with the new broker in 90 s")
        return Fault("broker_kill", at, "broker", f"kill -9 pid {old.pid}; restarted as pid {proc.pid}", back)

    def say_kill(self) -> Fault:
        """A `cosy say -o -` of a long text, killed once its first audio has reached the pipe."""
        self._victims += 1
        at = self.now()
        t = time.monotonic()
        err = self.folder / f"victim-{self._victims:03d}.err"
        with open(err, "wb") as stderr:
            proc = cosy_popen(self.s, ["say", LONG_TEXT, "-o", "-", "--no-play", "--timeout", "60"], subprocess.PIPE,
                              stderr)
        got = [0]

        def read() -> None:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536):
                got[0] += len(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:  # a WAV header (44 bytes) and some audio: it is mid-stream
            wait_for(lambda: got[0] > 44 + 8820 or proc.poll() is not None, 60, "the victim's first audio", 0.05)
        except TimeoutError:
            pass
        mid_stream = proc.poll() is None and got[0] > 44
        self.s.kill(proc, signal.SIGKILL)
        reader.join(10)
        rc = proc.returncode
        took = time.monotonic() - t
        if mid_stream:
            self.record(Outcome("say_victim", "killed", str(rc), at, took, True, f"killed after {got[0]} bytes"))
        elif rc == 0:  # it finished before it could be killed: a whole stream, still fine
            self.record(Outcome("say_victim", "completed", "0", at, took, True, f"{got[0]} bytes"))
        else:
            last = err.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            self.record(Outcome("say_victim", "failed", str(rc), at, took, rc in SAY_EXITS, last[0]))
        return Fault("say_kill", at, f"pid {proc.pid}", f"kill -9 after {got[0]} bytes of streamed WAV", mid_stream)

    def chunk_drop(self) -> Fault:
        """A client whose SUB (RCVHWM 2) is not read while its long job streams: the broker's XPUB
        (--audio-hwm 4) drops what does not fit, and the client must repair the gap by REPLAY.

        The stall lasts until an independent subscriber to the same job has seen DROP_CHUNKS chunks (more
        than the high-water marks and the socket buffers hold) or the final one, at most STALL_MAX_S
        (under the broker's --client-timeout: the stalled client sends no PING)."""
        at = self.now()
        t = time.monotonic()
        spec = JobSpec(DROP_TEXT, job=f"soak-drop-{self.rng.getrandbits(32):08x}")
        outcome = Outcome("drop", "failed", "?", at, 0.0, False)
        dropped = False
        seen: set[tuple[str, int]] = set()
        final = [False]
        observer = zmq.Context.instance().socket(zmq.SUB)
        observer.setsockopt(zmq.LINGER, 0)
        observer.setsockopt(zmq.SUBSCRIBE, P.topic(spec.job))
        observer.connect(self.s.endpoints.audio_out)

        def overflowed() -> bool:
            while observer.poll(0):
                frames = observer.recv_multipart()
                if len(frames) == 3:
                    h = P.ChunkHeader.unpack(frames[1])
                    seen.add((h.run, h.seq))
                    final[0] = final[0] or h.final
            return len(seen) >= DROP_CHUNKS or final[0]

        try:
            with Client(self.s.endpoints, rcvhwm=2) as client:
                client.connect(10)
                time.sleep(0.2)  # the observer's subscription reaches the broker before the job can start
                client.submit(spec)
                try:  # the stalled subscriber: nothing is read while the high-water marks overflow
                    wait_for(overflowed, STALL_MAX_S, "the stalled client's job to stream", interval=0.05)
                except TimeoutError:
                    pass
                stall = time.monotonic() - t
                deadline = time.monotonic() + 90
                end: Completed | Failed | Rejected | None = None
                while end is None and time.monotonic() < deadline:
                    for ev in client.poll(0.05):
                        if isinstance(ev, (Completed, Failed, Rejected)) and ev.job == spec.job:
                            end = ev
                took = time.monotonic() - t
                if isinstance(end, Completed):
                    dropped = end.replayed > 0
                    ok = plausible(end.samples, end.sample_rate, DROP_TEXT) and end.samples == end.done.samples
                    outcome = Outcome("drop", "completed", "ok", at, took, ok,
                                      f"stalled {stall:.1f} s while {len(seen)} chunks streamed; {end.replayed} "
                                      f"repaired; {end.samples} samples")
                elif end is None:
                    outcome = Outcome("drop", "hung", "-", at, took, False, "no end within 90 s of the stall")
                else:  # a broker restart in between is not possible (one fault at a time): a repair failure
                    outcome = Outcome("drop", "failed", end.code, at, took, False,
                                      f"stalled {stall:.1f} s while {len(seen)} chunks streamed: {end.message}")
        except Exception as exc:  # BrokerUnreachable and the like: recorded, the soak goes on
            outcome = Outcome("drop", "failed", type(exc).__name__, at, time.monotonic() - t, False, str(exc))
        finally:
            observer.close(linger=0)
        self.record(outcome)
        return Fault("chunk_drop", at, spec.job, outcome.detail, dropped)

    def cont_all(self) -> None:
        """SIGCONT whatever is still frozen (a failure mid-fault), so that it can be stopped."""
        for pid in list(self.stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stopped.clear()


def as_dicts(items: list[Any]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
