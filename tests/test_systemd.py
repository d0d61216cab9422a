"""systemd integration: the unit files, sd_notify from real broker/worker processes, the installer, journald logs.

The notify tests bind the datagram socket systemd would (NOTIFY_SOCKET), start real processes and
judge them by the timestamps at which their messages arrive: no fixed sleeps.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from stack import Stack, wait_for

from cosy.cli.status import fetch_status

# What WatchdogSec=1s would pass; the processes should ping about every 500 ms. Their poll loops
# check the watchdog only when they wake (up to 100 ms late in the broker, 250 ms in a worker), so a
# ping comes 0.5-0.75 s apart: with WatchdogSec=200ms the broker would ping at the very deadline.
WATCHDOG_USEC = 200_000
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}")

def cosy_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosy", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# --- a NOTIFY_SOCKET listener ---------------------------------------------------------------


@dataclass
class Note:
    t: float  # time.monotonic() at arrival
    fields: dict[str, str]


class NotifyListener:
    """The receiving end of sd_notify(3): a datagram socket; every message is kept with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[Note] = []

    def close(self) -> None:
        self.sock.close()

    def _recv(self, timeout: float) -> Note | None:
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        note = Note(time.monotonic(), fields)
        self.seen.append(note)
        return note

    def wait(self, pred: Callable[[Note], bool], timeout: float, what: str) -> Note:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            note = self._recv(left)
            if note is not None and pred(note):
                return note
        raise TimeoutError(f"no {what} within {timeout:g} s; got {[n.fields for n in self.seen]}")

    def collect(self, key: str, count: int, timeout: float) -> list[Note]:
        """The next COUNT messages that carry KEY."""
        return [self.wait(lambda n: key in n.fields, timeout, f"{key} #{i + 1}") for i in range(count)]


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cosy-notify-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listen(stack: Stack, notify_dir: Path, name: str) -> NotifyListener:
    """A listener whose address goes into the environment of the next process the stack spawns."""
    listener = NotifyListener(notify_dir / f"{name}.sock")
    stack.env.update(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    stack.env.pop("WATCHDOG_PID", None)
    return listener


def check_watchdog(listener: NotifyListener, count: int = 7) -> None:
    """WATCHDOG=1 keeps coming at about half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
    notes = listener.collect("WATCHDOG", count, timeout=5)
    assert all(n.fields["WATCHDOG"] == "1" for n in notes)
    gaps = sorted(b.t - a.t for a, b in zip(notes, notes[1:], strict=False))
    mean = sum(gaps) / len(gaps)
    limit = WATCHDOG_USEC / 1e6
    assert limit * 0.4 <= mean <= limit * 0.8, f"mean watchdog interval {mean:.3f} s, gaps {gaps}"
    assert gaps[-2] < limit, f"watchdog gaps {gaps} exceed WatchdogSec={limit} s"


def stop_and_expect_stopping(proc: subprocess.Popen, listener: NotifyListener) -> None:
    proc.send_signal(signal.SIGTERM)
    listener.wait(lambda n: n.fields.get("STOPPING") == "1", 10, "STOPPING=1")
    assert proc.wait(10) == 0


# --- (2) sd_notify from a real broker and a real worker -----------------------------------


def test_broker_notifies_ready_after_binding_then_watchdog_status_stopping(bare_stack: Stack,
                                                                              notify_dir: Path) -> None:
    listener = listen(bare_stack, notify_dir, "broker")
    try:
        proc = bare_stack.spawn("broker", "--runtime-dir", str(bare_stack.runtime_dir), "--heartbeat-ms", "200",
                                name="broker")
        ready = listener.wait(lambda n: n.fields.get("READY") == "1", 20, "READY=1")
        # At the moment READY arrives, every socket is bound and the broker answers on its front socket.
        eps = bare_stack.endpoints
        missing = [ep for ep in eps.as_dict().values() if not Path(ep[len("ipc://"):]).exists()]
        assert not missing, f"READY=1 before binding {missing}"
        status = fetch_status(eps, timeout_s=5)
        assert status["broker"]["pid"] == proc.pid
        assert ready.fields.get("MAINPID") == str(proc.pid)
        assert re.fullmatch(r"0 workers, 0 running, queued 0 interactive \+ 0 bulk", ready.fields["STATUS"])
        assert not [n for n in listener.seen if n is not ready and "READY" in n.fields]

        check_watchdog(listener)
        assert any("STATUS" in n.fields for n in listener.seen if n.t > ready.t), "no STATUS= after READY=1"
        stop_and_expect_stopping(proc, listener)
    finally:
        listener.close()


def test_worker_notifies_ready_once_registered(bare_stack: Stack, notify_dir: Path) -> None:
    broker_listener = listen(bare_stack, notify_dir, "broker")
    try:
        bare_stack.start_broker()
        worker_listener = listen(bare_stack, notify_dir, "worker")
        try:
            name = "tone-notify"
            # A slow first chunk makes the warm-up take a while: READY must wait for it.
            proc = bare_stack.start_worker("tone", name=name, options={"first_delay_ms": 300}, wait=False)
            assert not [w for w in fetch_status(bare_stack.endpoints)["workers"] if w["name"] == name]
            ready = worker_listener.wait(lambda n: n.fields.get("READY") == "1", 60, "the worker's READY=1")
            assert "tone" in ready.fields.get("STATUS", "")
            names = [w["name"] for w in fetch_status(bare_stack.endpoints, timeout_s=5)["workers"]]
            assert name in names, f"READY=1 before the worker was registered: {names}"

            check_watchdog(worker_listener)
            # The broker's STATUS= line (every 5 s) now counts the worker.
            broker_listener.wait(lambda n: n.fields.get("STATUS", "").startswith("1 workers"), 12,
                                 "a broker STATUS= line with 1 worker")
            stop_and_expect_stopping(proc, worker_listener)
            wait_for(lambda: not fetch_status(bare_stack.endpoints)["workers"], 10, "the worker to leave")
        finally:
            worker_listener.close()
        stop_and_expect_stopping(bare_stack.broker, broker_listener)  # type: ignore[arg-type]
    finally:
        broker_listener.close()


# --- (4) journald logging -------------------------------------------------------------------


def _log_lines(journal: bool) -> list[str]:
    """A child logs through cosy.logs with stderr on a pipe; JOURNAL_STREAM names that very pipe when asked."""
    code = ("import logging\nfrom cosy import logs\nlogs.setup('INFO')\n"
            "logging.getLogger('cosy.test').debug('hidden')\nlogging.getLogger('cosy.test').info('hello journal')\n")
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        subprocess.run([sys.executable, "-c", code], stderr=write_fd, stdout=subprocess.DEVNULL, env=env,
                       timeout=30, check=True)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as f:
        return f.read().splitlines()


def test_logs_have_no_timestamps_under_journald() -> None:
    journal = _log_lines(journal=True)
    assert journal == ["cosy.test: hello journal"]
    assert not TIMESTAMP.search(journal[0])
    plain = _log_lines(journal=False)  # the control: elsewhere lines do carry a time
    assert len(plain) == 1 and "hello journal" in plain[0] and TIMESTAMP.search(plain[0])


# --- (3) the installer ------------------------------------------------------------------------


def _sections(out: str) -> dict[str, str]:
    parts = re.split(r"^# ==> (.+) <==$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _exec_paths(text: str) -> list[str]:
    return [shlex.split(line.split("=", 1)[1])[0] for line in text.splitlines()
            if line.lstrip("# ").startswith("ExecStart=")]


def test_install_dry_run_prints_broker_and_two_worker_instances(tmp_path: Path) -> None:
    proc = cosy_cli("systemd", "install", "--dry-run", "--gpus", "0,1", "--unit-dir", str(tmp_path / "units"),
                    "--config-dir", str(tmp_path / "etc"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists(), "--dry-run wrote files"
    files = _sections(proc.stdout)
    broker = files[str(tmp_path / "units" / "cosy-broker.service")]
    template = files[str(tmp_path / "units" / "cosy-worker@.service")]
    assert str(tmp_path / "units" / "cosy.target") in files
    assert not [ln for ln in broker.splitlines() + template.splitlines() if "@COSY@" in ln and ln[:1] != "#"]
    assert re.search(r"^Type=notify$", broker, re.M) and re.search(r"^WatchdogSec=", broker, re.M)
    assert "CUDA_VISIBLE_DEVICES=%i" in template and "--device %i" in template
    for gpu in ("0", "1"):
        block = proc.stdout.split(f"# --- cosy-worker@{gpu}.service\n", 1)[1].split("# ---", 1)[0]
        assert f"CUDA_VISIBLE_DEVICES={gpu}" in block and f"--device {gpu} " in block
    assert re.search(r"enable --now .*cosy-worker@0\.service cosy-worker@1\.service", proc.stdout)
    paths = _exec_paths(broker) + _exec_paths(template) + _exec_paths(proc.stdout)
    assert len(paths) >= 4
    for path in paths:
        assert os.path.isabs(path) and os.access(path, os.X_OK), f"{path} is not an absolute executable"


def test_install_rejects_bad_gpu_list(tmp_path: Path) -> None:
    proc = cosy_cli("systemd", "install", "--dry-run", "--gpus", "0,x", "--unit-dir", str(tmp_path))
    assert proc.returncode == 2 and "--gpus" in proc.stderr


# --- (1) systemd-analyze verify -------------------------------------------------------------

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")


def _install(tmp_path: Path, *extra: str) -> Path:
    units = tmp_path / "units"
    proc = cosy_cli("systemd", "install", "--unit-dir", str(units), "--config-dir", str(tmp_path / "etc"), *extra)
    assert proc.returncode == 0, proc.stderr
    return units


def _verify(units: Path, names: list[str], user: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    cmd = ["systemd-analyze", "verify", "--man=no"]
    if user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # the user manager needs one to resolve %t
        cmd.insert(1, "--user")
    return subprocess.run([*cmd, *(str(units / n) for n in names)], capture_output=True, text=True, env=env,
                          timeout=60)


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    units = _install(tmp_path, "--gpus", "0,1", *(["--user"] if user else []))
    broker = (units / "cosy-broker.service").read_text()
    assert ("User=cosy" in broker) is not user and ("ProtectSystem=strict" in broker) is not user
    names = ["cosy-broker.service", "cosy-worker@0.service", "cosy-worker@1.service", "cosy.target"]
    proc = _verify(units, names, user, tmp_path)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "cosy" in ln]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The control for the test above: verify does fail on a unit whose ExecStart does not exist."""
    units = _install(tmp_path, "--gpus", "0")
    unit = units / "cosy-broker.service"
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/nonexistent/cosy", unit.read_text(), flags=re.M))
    proc = _verify(units, ["cosy-broker.service"], False, tmp_path)
    assert proc.returncode != 0 and "/nonexistent/cosy" in proc.stderr


def test_install_writes_engine_and_model_to_worker_env(tmp_path: Path) -> None:
    model = tmp_path / "CosyVoice2-0.5B"
    model.mkdir()
    units = _install(tmp_path, "--gpus", "0", "--engine", "cosyvoice", "--model-dir", str(model))
    env = (tmp_path / "etc" / "worker.env").read_text()
    assert "COSY_ENGINE=cosyvoice" in env and f"COSY_WORKER_ARGS=--option model_dir={model}" in env
    assert "${COSY_ENGINE} $COSY_WORKER_ARGS" in (units / "cosy-worker@.service").read_text()


# --- the gateway units ------------------------------------------------------------------------

GATEWAY_UNITS = {"cosy-http.service": "http", "cosy-wyoming.service": "wyoming", "cosy-grpc.service": "grpc"}


def test_install_renders_every_gateway_unit_with_its_command(tmp_path: Path) -> None:
    proc = cosy_cli("systemd", "install", "--dry-run", "--gpus", "0", "--unit-dir", str(tmp_path / "units"),
                    "--config-dir", str(tmp_path / "etc"))
    assert proc.returncode == 0, proc.stderr
    files = _sections(proc.stdout)
    for unit, command in GATEWAY_UNITS.items():
        text = files[str(tmp_path / "units" / unit)]
        (exec_line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
        program, sub, *_ = shlex.split(exec_line.split("=", 1)[1])
        assert os.path.isabs(program) and os.access(program, os.X_OK), exec_line
        assert sub == command, exec_line
        assert "PartOf=cosy.target" in text and "After=network.target cosy-broker.service" in text
        assert re.search(r"^User=cosy$", text, re.M) and re.search(r"^NoNewPrivileges=yes$", text, re.M)
        assert f"also installed, not enabled: {unit}" in proc.stderr
    grpc_unit = files[str(tmp_path / "units" / "cosy-grpc.service")]
    assert 'Environment="COSY_GRPC_ARGS=--host 127.0.0.1 --port 50051"' in grpc_unit  # loopback, the default port
    assert "EnvironmentFile=-%E/cosy/grpc.env" in grpc_unit


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_gateway_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    units = _install(tmp_path, "--gpus", "0", *(["--user"] if user else []))
    proc = _verify(units, ["cosy-broker.service", *GATEWAY_UNITS], user, tmp_path)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "cosy" in ln]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
