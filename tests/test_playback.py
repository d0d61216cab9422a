"""Playback tested for real: a PulseAudio server with a null sink, recorded from its monitor.

A private PulseAudio server runs in a temporary directory (anonymous auth on a unix socket,
one null sink). Children get ``PULSE_SERVER=unix:<dir>/native``; PortAudio (sounddevice)
reaches it through ALSA's pulse plugin (Debian's ``libasound2-plugins``, a dependency of
``pulseaudio``), whose ``99-pulse.conf`` hook makes the ALSA ``default`` device PulseAudio
whenever a server is reachable. ``parec`` records the sink's monitor while ``cosy say``
plays, and the recording is matched against the file the same command saved.

Skipped, with the reason, only where PulseAudio cannot run (binaries missing or the server
does not start).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from stack import Stack, read_wav, transcribe, wait_for

RATE = 22050  # Piper's rate and the rate we record the monitor at
SINK = "cosy_test"
FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}
PROC_TIMEOUT_S = 600  # hard limit on every helper process, in case pytest itself is killed


@dataclass
class Pulse:
    dir: Path
    proc: subprocess.Popen

    @property
    def server(self) -> str:
        return f"unix:{self.dir}/native"

    @property
    def env(self) -> dict[str, str]:
        return {"PULSE_SERVER": self.server}


def _pulse_env(base: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(base), "XDG_RUNTIME_DIR": str(base), "XDG_CONFIG_HOME": str(base / "config"),
            "PULSE_RUNTIME_PATH": str(base), "PULSE_STATE_PATH": str(base / "state")}


def _pactl_ok(pulse: Pulse) -> bool:
    proc = subprocess.run(["pactl", "info"], env={**os.environ, **pulse.env}, capture_output=True, timeout=10)
    return proc.returncode == 0 and f"Default Sink: {SINK}" in proc.stdout.decode()


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def pulse() -> Iterator[Pulse]:
    missing = [b for b in ("pulseaudio", "parec", "pactl") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"PulseAudio cannot run here: {', '.join(missing)} not installed "
                    "(apt install pulseaudio pulseaudio-utils)")
    base = Path(tempfile.mkdtemp(prefix="cosy-pa-", dir="/tmp"))  # short: unix socket paths max 107 chars
    log = base / "pulseaudio.log"
    cmd = ["timeout", "-k", "5", str(PROC_TIMEOUT_S), "pulseaudio", "--daemonize=no", "--system=false", "-n",
           "--exit-idle-time=-1", "--disallow-exit", "--disable-shm=yes", "--log-target=stderr",
           f"--load=module-null-sink sink_name={SINK}",
           f"--load=module-native-protocol-unix socket={base}/native auth-anonymous=1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_pulse_env(base), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    p = Pulse(base, proc)
    try:
        try:
            wait_for(lambda: proc.poll() is not None or ((base / "native").exists() and _pactl_ok(p)),
                     20, "the PulseAudio server")
        except TimeoutError:
            pass
        if proc.poll() is not None or not _pactl_ok(p):
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            pytest.skip(f"PulseAudio cannot run here: {' | '.join(tail) or 'the server did not start'}")
        if not _has_output_device(p.env):
            pytest.fail("PulseAudio runs but PortAudio does not see it as an output device: ALSA's pulse plugin "
                        "is missing (apt install libasound2-plugins)")
        yield p
    finally:
        _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


class Recorder:
    """``parec`` on the null sink's monitor: raw s16le mono at RATE, appended to a file as it arrives."""

    def __init__(self, pulse: Pulse, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["timeout", "-k", "5", str(PROC_TIMEOUT_S), "parec", f"--device={SINK}.monitor", "--format=s16le",
             f"--rate={RATE}", "--channels=1", "--raw", "--latency-msec=20"],
            env={**os.environ, **pulse.env}, stdout=self._file, stderr=subprocess.PIPE)

    def audio(self) -> np.ndarray:
        data = self.path.read_bytes()
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")

    def wait_started(self) -> None:
        wait_for(lambda: self.proc.poll() is not None or len(self.audio()) > RATE // 10, 15, "parec to record")
        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""

    def wait_quiet_after_sound(self, quiet_s: float = 0.5, timeout: float = 20) -> np.ndarray:
        """Poll until the recording holds sound followed by `quiet_s` of silence; return it."""

        def done() -> list[np.ndarray]:
            x = self.audio()
            loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 300)
            return [x] if len(loud) and len(x) - loud[-1] > quiet_s * RATE else []

        return wait_for(done, timeout, "the played audio to reach the sink's monitor", interval=0.05)[0]

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)
        self._file.close()


@pytest.fixture
def recorder(pulse: Pulse, tmp_path: Path) -> Iterator[Recorder]:
    rec = Recorder(pulse, tmp_path / "monitor.raw")
    try:
        rec.wait_started()
        yield rec
    finally:
        rec.stop()


# --- signal matching ----------------------------------------------------------------------


def best_alignment(recording: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Lag of `reference` inside `recording` and the normalised cross-correlation there (1.0 = identical)."""
    r = recording.astype(np.float64)
    s = reference.astype(np.float64)
    if len(r) < len(s):
        r = np.concatenate([r, np.zeros(len(s) - len(r))])
    n = 1 << int(np.ceil(np.log2(len(r) + len(s))))
    corr = np.fft.irfft(np.fft.rfft(r, n) * np.conj(np.fft.rfft(s, n)), n)[: len(r) - len(s) + 1]
    energy = np.concatenate([[0.0], np.cumsum(r * r)])
    window = np.sqrt(np.maximum(energy[len(s):] - energy[: len(r) - len(s) + 1], 1e-9))
    ncc = corr / (window * np.linalg.norm(s))
    lag = int(np.argmax(ncc))
    return lag, float(ncc[lag])


def active_span(x: np.ndarray, rel: float = 0.02) -> tuple[int, int]:
    """First and last sample louder than `rel` of the peak."""
    a = np.abs(x.astype(np.float64))
    idx = np.flatnonzero(a > rel * a.max())
    return int(idx[0]), int(idx[-1])


def bursts(x: np.ndarray, min_gap_s: float = 0.05, threshold: int = 500) -> list[tuple[int, int]]:
    """Runs of sound separated by at least `min_gap_s` of silence, as (start, end) sample indices."""
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) > threshold)
    if not len(loud):
        return []
    breaks = np.flatnonzero(np.diff(loud) > min_gap_s * RATE)
    starts = [loud[0], *loud[breaks + 1]]
    ends = [*loud[breaks], loud[-1]]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


# --- cosy say through the sound server ----------------------------------------------------


def test_say_plays_exactly_the_synthesized_audio(stack: Stack, pulse: Pulse, recorder: Recorder,
                                                  tmp_path: Path) -> None:
    stack.start_worker("piper", name="p")
    stack.env.update(pulse.env)
    out = tmp_path / "said.wav"
    proc = stack.cosy("say", FOX, "--out", str(out), "--verbose", timeout=120, check=True)
    recording = recorder.wait_quiet_after_sound()
    reference, rate = read_wav(out)
    assert rate == RATE

    lag, ncc = best_alignment(recording, reference)
    print(f"normalised correlation {ncc:.4f} at lag {lag / RATE * 1000:.0f} ms; "
          f"{proc.stderr.decode().strip()}")
    assert ncc > 0.9, f"the recording does not match the synthesized audio (peak correlation {ncc:.3f})"

    # Same length: the sound in the recording spans what the file spans, nothing cut, nothing added.
    ref_a, ref_b = active_span(reference)
    rec_a, rec_b = active_span(recording)
    tolerance = int(0.03 * RATE)
    assert abs((rec_b - rec_a) - (ref_b - ref_a)) <= tolerance, (
        f"played {(rec_b - rec_a) / RATE:.3f} s of sound, synthesized {(ref_b - ref_a) / RATE:.3f} s")
    assert abs((lag + ref_a) - rec_a) <= tolerance, "the sound starts where the alignment says it should"

    # And it is speech, as heard from the sink.
    played = recording[lag: lag + len(reference)]
    heard = set(transcribe(played, RATE).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard} in the recording"
    assert re.search(r"\b\d+ underruns\b", proc.stderr.decode()), proc.stderr.decode()


# --- the jitter buffer in-process, through the same device ---------------------------------


@pytest.fixture
def sounddevice_on_pulse(pulse: Pulse) -> Iterator[None]:
    """Point this process's PortAudio at the test server (re-initialised, as it enumerates at import)."""
    import sounddevice as sd

    old = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = pulse.server
    sd._terminate()
    sd._initialize()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old
        sd._terminate()
        sd._initialize()


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def test_live_player_survives_gaps_and_counts_underruns(sounddevice_on_pulse: None, recorder: Recorder) -> None:
    from cosy.cli.playback import LivePlayer

    player = LivePlayer(RATE)
    try:
        first, second = tone(0.3, 440), tone(0.3, 660)
        player.feed(first)
        # The queue runs dry: the callback must play silence and count it, not stop or raise.
        wait_for(lambda: player.played >= len(first) and player.underruns > 0, 10, "an underrun after chunk 1")
        recorder.wait_quiet_after_sound(quiet_s=0.2)  # the gap is audible at the sink: 0.2 s of silence
        assert player._stream.active, "the output stream stopped during the underrun"
        player.feed(second)
        player.finish()
        assert player.wait(timeout=10), "playback did not drain after the gap"
        assert player.played == len(first) + len(second)
        assert player.underruns >= 1
    finally:
        player.close()
    recording = recorder.wait_quiet_after_sound()
    heard = bursts(recording)
    assert len(heard) == 2, f"expected two tones with silence between, heard sound runs {heard}"
    durations = [(b - a) / RATE for a, b in heard]
    assert all(abs(d - 0.3) < 0.03 for d in durations), durations


def test_live_player_fed_in_time_has_no_underruns(sounddevice_on_pulse: None, recorder: Recorder) -> None:
    from cosy.cli.playback import LivePlayer

    player = LivePlayer(RATE)
    try:
        for _ in range(10):  # everything queued before the device asks: never a dry callback
            player.feed(tone(0.05))
        player.finish()
        assert player.wait(timeout=10)
        assert player.underruns == 0
        assert player.played == 10 * len(tone(0.05))
    finally:
        player.close()
    (a, b), = bursts(recorder.wait_quiet_after_sound())
    assert abs((b - a) / RATE - 0.5) < 0.03


# --- no audio device -----------------------------------------------------------------------


def _no_device_env(tmp_path: Path) -> dict[str, str]:
    return {"PULSE_SERVER": f"unix:{tmp_path}/no-such-server"}


def _has_output_device(env: dict[str, str]) -> bool:
    probe = ("import sounddevice as sd\ntry:\n    sd.query_devices(kind='output')\n    print('yes')\n"
             "except Exception:\n    print('no')")
    proc = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, timeout=30)
    return proc.stdout.strip() == b"yes"


def test_say_without_audio_device_explains_in_one_line(stack: Stack, tmp_path: Path) -> None:
    env = _no_device_env(tmp_path)
    if _has_output_device(env):
        pytest.skip("this machine has a sound card, so there is no way to run without an output device")
    stack.start_worker("tone", name="t")
    stack.env.update(env)
    proc = stack.cosy("say", "x", timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("cosy: ") and "Traceback" not in err, err
    assert "audio" in err and "--out" in err

    out = tmp_path / "saved.wav"
    proc = stack.cosy("say", "still saved", "--out", str(out), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and f"saving to {out} only" in err
    audio, rate = read_wav(out)
    assert rate == RATE and len(audio) == int(len("still saved") * 0.020 * RATE)  # the tone engine's length
