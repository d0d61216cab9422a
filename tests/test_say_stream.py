"""`cosy say -`: text streamed in is spoken sentence by sentence as it arrives, heard through the real PulseAudio
null sink (tests/test_playback.py's server and recorder), while the rest is still being written."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from stack import Stack, read_wav, transcribe, wait_for
from test_playback import RATE, Pulse, Recorder, best_alignment, pulse, recorder  # noqa: F401 (fixtures)

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Then it ran far away into the dark woods.",
             "The hunters looked for it all day long.", "They searched the fields and the hills.",
             "They asked the farmers and the millers.", "Nobody in the village ever saw it again.",
             "Some say it lives there still.", "Others say it went over the mountains.",
             "Nobody knows for sure.", "And that is the end of the story."]  # 20 s to write
FOX_WORDS = {"quick", "brown", "fox", "jumps", "jumped", "over", "lazy", "dog"}
EVERY_S = 2.0


def say_reading_stdin(stack: Stack, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cosy", "say", *args, "--runtime-dir", str(stack.runtime_dir)],
                            env=stack.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stack.procs.append(proc)  # stopped by PID with the stack, whatever happens
    return proc


def test_streamed_sentences_are_heard_before_the_last_one_is_written(stack: Stack, pulse: Pulse,  # noqa: F811
                                                                     recorder: Recorder,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    stack.start_worker("piper", name="p")
    stack.env.update(pulse.env)
    out, srt = tmp_path / "streamed.wav", tmp_path / "streamed.srt"
    say = say_reading_stdin(stack, "-", "--out", str(out), "--captions", str(srt), "--verbose")
    assert say.stdin is not None
    written: list[float] = []
    done_writing = threading.Event()
    stop = threading.Event()

    def feed() -> None:  # one sentence every EVERY_S seconds, as a program that writes slowly
        try:
            for i, sentence in enumerate(SENTENCES):
                if i and stop.wait(EVERY_S):
                    return
                say.stdin.write(f"{sentence}\n".encode())
                say.stdin.flush()
                written.append(time.monotonic())
            done_writing.set()
        finally:
            say.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        # Sound reaches the sink's monitor (half a second of it) while sentences are still to come.
        wait_for(lambda: np.count_nonzero(np.abs(recorder.audio().astype(np.int32)) > 300) > RATE // 2, 60,
                 "the first sentence to be heard", interval=0.02)
        heard_at = time.monotonic()
        assert not done_writing.is_set() and len(written) < len(SENTENCES), (
            f"nothing was heard before the last sentence was written ({len(written)} written, "
            f"{heard_at - written[0]:.1f} s after the first)")
        assert done_writing.wait(60), "the feeder could not write every sentence"
        feeder.join(10)
        say.wait(120)
    finally:
        stop.set()
        feeder.join(10)
    assert say.stderr is not None
    err = say.stderr.read()
    assert say.returncode == 0, err.decode() + stack.log_text()
    print(f"heard {heard_at - written[0]:.2f} s after the first sentence was written, "
          f"{written[-1] - heard_at:.2f} s before the last; {err.decode().strip()}")

    # What was heard first is the first sentence: its audio as saved, recognisable as speech.
    import pysubs2

    cues = pysubs2.load(str(srt))
    assert [c.plaintext for c in cues] == SENTENCES  # one job per sentence, in order
    saved, rate = read_wav(out)
    assert rate == RATE
    first = saved[: round(cues[0].end * RATE / 1000)]
    recording = recorder.wait_quiet_after_sound(quiet_s=0.5, timeout=60)
    lag, ncc = best_alignment(recording, first)
    assert ncc > 0.9, f"the first sentence's audio is not in the recording (peak correlation {ncc:.3f})"
    loud = np.flatnonzero(np.abs(recording.astype(np.int32)) > 300)
    assert lag <= loud[0] + RATE // 10, "something else was played before the first sentence"
    heard = set(transcribe(recording[lag: lag + len(first)], RATE).split())
    assert len(heard & FOX_WORDS) >= 4, heard


def test_a_clause_without_a_stop_is_spoken_after_a_pause(stack: Stack, tmp_path: Path) -> None:
    """--file /dev/stdin reads the pipe as it comes too; a clause with no sentence end is submitted once the
    input has been quiet for --flush-after seconds, while standard input is still open."""
    stack.start_worker("tone", name="t", options={"delay_ms": 0})
    out, vtt = tmp_path / "paused.wav", tmp_path / "paused.vtt"
    say = say_reading_stdin(stack, "--file", "/dev/stdin", "--no-play", "--out", str(out), "--captions", str(vtt),
                            "--flush-after", "0.5")
    assert say.stdin is not None
    say.stdin.write(b"a clause with no stop at all")
    say.stdin.flush()
    wait_for(lambda: sum(w["jobs_done"] for w in stack.status()["workers"]) == 1, 30,
             "the clause to be rendered while the input is still open")
    assert say.poll() is None
    say.stdin.write(b" and then Dr. Jones ended it.\n")
    say.stdin.close()
    say.wait(60)
    assert say.stderr is not None
    err = say.stderr.read()
    assert say.returncode == 0, err.decode()
    import pysubs2

    assert [c.plaintext for c in pysubs2.load(str(vtt))] == ["a clause with no stop at all",
                                                             "and then Dr. Jones ended it."]
    assert len(read_wav(out)[0]) == int(len("a clause with no stop at all") * 0.02 * 22050) + \
        int(len("and then Dr. Jones ended it.") * 0.02 * 22050)
