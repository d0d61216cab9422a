"""tcp with CURVE: authorised peers are served, everyone else is refused; nothing listens beyond loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stack import HEARTBEAT_MS, Stack, read_wav, wait_for

from cosy.endpoints import free_tcp_base

HOST = "127.0.0.2"  # a second loopback address stands in for another host


def keys(tmp: Path) -> dict[str, Path]:
    """Broker, worker, client and stranger key folders laid out as docs/deploy.md says."""
    def cosy_keys(folder: Path, name: str) -> None:
        subprocess.run([sys.executable, "-m", "cosy", "keys", "generate", "--dir", str(folder), "--name", name],
                       check=True, capture_output=True, timeout=30)

    dirs = {n: tmp / n for n in ("broker", "worker", "client", "stranger")}
    cosy_keys(dirs["broker"], "server")
    for peer in ("worker", "client", "stranger"):
        cosy_keys(dirs[peer], "client")
        shutil.copy(dirs["broker"] / "server.key", dirs[peer] / "server.key")
    (dirs["broker"] / "authorized").mkdir()
    for peer in ("worker", "client"):  # the stranger's key is never authorised
        shutil.copy(dirs[peer] / "client.key", dirs["broker"] / "authorized" / f"{peer}.key")
    return dirs


def test_secret_keys_are_private(tmp_path: Path) -> None:
    d = keys(tmp_path)
    assert (d["broker"] / "server.key_secret").stat().st_mode & 0o777 == 0o600
    proc = subprocess.run([sys.executable, "-m", "cosy", "keys", "generate", "--dir", str(d["broker"]),
                           "--name", "server"], capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"not overwriting" in proc.stderr


def test_non_loopback_bind_without_keys_is_refused(bare_stack: Stack) -> None:
    # It exits before binding anything: nothing ever listens beyond loopback here.
    proc = subprocess.run([sys.executable, "-m", "cosy", "broker", "--bind", "tcp://0.0.0.0:7700",
                           "--runtime-dir", str(bare_stack.runtime_dir)], env=bare_stack.env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"without CURVE keys" in proc.stderr


def test_curve_serves_authorised_peers_and_refuses_others(bare_stack: Stack, tmp_path: Path) -> None:
    d = keys(tmp_path)
    s = bare_stack
    url = f"tcp://{HOST}:{free_tcp_base(HOST)}"
    broker = s.spawn("broker", "--bind", url, "--curve-dir", str(d["broker"]), "--runtime-dir",
                     str(s.runtime_dir), "--heartbeat-ms", str(HEARTBEAT_MS), name="broker")
    # An unauthorised worker starts first, so it has had longer than the good one to try.
    s.spawn("worker", "--engine", "tone", "--name", "intruder", "--connect", url, "--curve-dir",
            str(d["stranger"]), "--runtime-dir", str(s.runtime_dir), "--heartbeat-ms", str(HEARTBEAT_MS),
            name="intruder")
    s.spawn("worker", "--engine", "tone", "--name", "remote", "--connect", url, "--curve-dir", str(d["worker"]),
            "--runtime-dir", str(s.runtime_dir), "--heartbeat-ms", str(HEARTBEAT_MS), name="worker")

    def cosy(*args: str, curve: Path | None) -> subprocess.CompletedProcess:
        env = {**s.env}
        env.pop("COSY_CURVE_DIR", None)
        if curve is not None:
            env["COSY_CURVE_DIR"] = str(curve)
        return subprocess.run([sys.executable, "-m", "cosy", *args, "--connect", url], env=env,
                              capture_output=True, timeout=60)

    def worker_joined() -> bool:
        assert broker.poll() is None, s.log_text()
        proc = cosy("status", "--json", curve=d["client"])
        return proc.returncode == 0 and b'"remote"' in proc.stdout

    wait_for(worker_joined, 60, "the remote worker to join over CURVE", interval=0.2)
    joined = cosy("status", "--json", curve=d["client"])
    assert b'"intruder"' not in joined.stdout  # its key is not in authorized/: it never got in
    out = tmp_path / "ok.wav"
    ok = cosy("say", "served over curve", "--no-play", "--out", str(out), curve=d["client"])
    assert ok.returncode == 0, ok.stderr.decode()
    audio, rate = read_wav(out)
    assert len(audio) == int(len("served over curve") * 0.02 * rate)

    stranger = cosy("status", "--json", curve=d["stranger"])
    assert stranger.returncode == 3 and b"did not answer" in stranger.stderr
    nobody = cosy("status", "--json", curve=None)
    assert nobody.returncode == 3
    assert broker.poll() is None


@pytest.mark.parametrize("missing", ["server.key_secret", "authorized"])
def test_broker_with_incomplete_keys_says_what_is_missing(bare_stack: Stack, tmp_path: Path, missing: str) -> None:
    d = keys(tmp_path)
    target = d["broker"] / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = subprocess.run([sys.executable, "-m", "cosy", "broker", "--bind", f"tcp://{HOST}:{free_tcp_base(HOST)}",
                           "--curve-dir", str(d["broker"]), "--runtime-dir", str(bare_stack.runtime_dir)],
                          env=bare_stack.env, capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert missing.encode() in proc.stderr and b"Traceback" not in proc.stderr
