"""`cosy say`: one job, played as it arrives and/or saved."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cosy import protocol as P
from cosy.cli import exits
from cosy.endpoints import Endpoints

MAX_INPUT_BYTES = 1 << 20


def _read_text(text: str | None, file: Path | None) -> str:
    if file is not None:
        if text is not None:
            exits.fail("give the text as an argument or with --file, not both", exits.USAGE)
        try:
            data = file.read_bytes()[:MAX_INPUT_BYTES + 1]
        except OSError as exc:
            exits.fail(f"cannot read {file}: {exc.strerror}", exits.USAGE)
    elif text is None or text == "-":
        if text is None and sys.stdin.isatty():
            exits.fail("no text: give it as an argument, with --file, or on standard input with '-'", exits.USAGE)
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    else:
        return text
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        exits.fail(f"the input is not valid UTF-8 (byte {exc.start})", exits.USAGE)


def _print_voices(eps: Endpoints) -> int:
    from cosy.cli.status import fetch_status

    st = fetch_status(eps)
    by_voice: dict[str, list[str]] = {}
    for w in st["workers"]:
        for v in w["voices"]:
            by_voice.setdefault(v, []).append(w["name"])
    if not by_voice:
        print("no workers are connected, so no voices are served", file=sys.stderr)
        return exits.OK
    for v in sorted(by_voice):
        print(f"{v}\t{', '.join(by_voice[v])}")
    return exits.OK


def run_say(eps: Endpoints, *, text: str | None, file: Path | None, voice: str | None, out: str | None,
            raw: bool, play: bool, speed: float, priority: str, timeout: float, list_voices: bool,
            verbose: bool, instruct: str = "") -> int:
    t_start = time.perf_counter()
    if list_voices:
        return _print_voices(eps)
    body = _read_text(text, file)
    if not body.strip():
        exits.fail("the text is empty", exits.USAGE)
    if len(body) > P.MAX_TEXT_CHARS:
        exits.fail(f"the text is {len(body)} characters; one job takes at most {P.MAX_TEXT_CHARS} "
                   "(use `cosy batch` for long documents)", exits.USAGE)
    if not 0.25 <= speed <= 4.0:
        exits.fail(f"--speed {speed} is outside 0.25-4.0", exits.USAGE)
    if priority not in P.PRIORITIES:
        exits.fail(f"--priority must be one of {', '.join(P.PRIORITIES)}", exits.USAGE)
    to_stdout = out == "-"
    out_path = None if out is None or to_stdout else Path(out)
    if out_path is not None:
        from cosy.audio import format_for

        try:
            format_for(out_path)
        except ValueError as exc:
            exits.fail(str(exc), exits.USAGE)
        if not out_path.parent.is_dir():
            exits.fail(f"cannot write {out_path}: folder {out_path.parent} does not exist", exits.USAGE)
    if raw and not to_stdout:
        exits.fail("--raw applies to -o - (audio on standard output)", exits.USAGE)
    if to_stdout and sys.stdout.isatty():
        exits.fail("refusing to write audio to a terminal: pipe it (cosy say ... -o - | aplay)", exits.USAGE)
    from cosy.client import (
        Audio,
        BrokerRestarted,
        BrokerUnreachable,
        Client,
        Completed,
        Failed,
        JobSpec,
        Rejected,
        Started,
    )

    sink = None
    if to_stdout:
        from cosy.audio import PcmSink

        sink = PcmSink(sys.stdout.buffer, raw=raw)
    player = None
    spec = JobSpec(text=body, voice=voice, speed=speed, priority=priority, instruct=instruct)
    client = Client(eps)
    t_first = None
    try:
        try:
            client.connect(timeout_s=min(timeout, 5.0))
        except BrokerUnreachable as exc:
            exits.fail(str(exc), exits.UNREACHABLE)
        client.submit(spec)
        # What does not need the broker happens while the worker synthesizes: initialising PortAudio
        # (~60 ms) to play, importing numpy (~90 ms) to save a file. Nothing else: on a small machine a
        # CPU engine needs the cores (Piper's first sentence took ~100 ms longer on 2 cores while
        # `cosy say` imported numpy). Playing and piping work on the chunks' bytes, without numpy.
        play = play and not to_stdout
        player_error = None
        if play:
            from cosy.cli.playback import NoAudioDevice, check_output_device

            try:
                check_output_device()
            except NoAudioDevice as exc:
                player_error = str(exc)
                play = False
                if out_path is None:
                    client.cancel(spec.job)
                    client.poll(0.05)
                    exits.fail(f"{exc}; use --out FILE to save the audio instead", exits.JOB_FAILED)
                print(f"cosy: {exc}; saving to {out_path} only", file=sys.stderr)
        if out_path is not None:
            import numpy  # noqa: F401
        deadline = time.monotonic() + timeout
        busy_tries = 0
        retry_at = 0.0
        while True:
            if time.monotonic() > deadline:
                client.cancel(spec.job)
                why = "the broker stayed busy" if retry_at else "no complete audio"
                exits.fail(f"{why} after {timeout:g} s (the job was cancelled)", exits.BUSY)
            if retry_at and time.monotonic() >= retry_at:
                retry_at = 0.0
                client.submit(spec)
            for ev in client.poll(0.05):
                if isinstance(ev, Audio):
                    if t_first is None:
                        t_first = time.perf_counter()
                    if play:
                        if player is None:
                            from cosy.cli.playback import LivePlayer, NoAudioDevice

                            try:
                                player = LivePlayer(ev.sample_rate)
                            except NoAudioDevice as exc:
                                play = False
                                print(f"cosy: {exc}", file=sys.stderr)
                        elif ev.restart:
                            player.restart()
                        if player is not None:
                            player.feed(ev.data)
                    if sink is not None:
                        if ev.restart and sink.started:
                            exits.fail("the worker was lost mid-stream and the audio already piped cannot be "
                                       "taken back; use --out FILE for a file that is always complete",
                                       exits.JOB_FAILED)
                        sink.write(ev.data, ev.sample_rate)
                elif isinstance(ev, Started) and ev.attempt > 1:
                    print(f"cosy: worker lost; attempt {ev.attempt} on {ev.worker}", file=sys.stderr)
                elif isinstance(ev, BrokerRestarted):
                    print("cosy: the broker restarted; job resubmitted", file=sys.stderr)
                elif isinstance(ev, Rejected) and ev.code == P.BUSY:
                    # The queue is full: back off and submit again until --timeout.
                    busy_tries += 1
                    retry_at = time.monotonic() + min(5.0, 0.2 * 2 ** busy_tries)
                    if busy_tries == 1:
                        print(f"cosy: {ev.message}; retrying", file=sys.stderr)
                elif isinstance(ev, Rejected):
                    exits.fail(ev.message, exits.USAGE)
                elif isinstance(ev, Failed):
                    exits.fail(f"synthesis failed ({ev.code}): {ev.message}", exits.JOB_FAILED)
                elif isinstance(ev, Completed):
                    return _finish(ev, out_path, player, t_start, t_first, verbose, player_error)
    except KeyboardInterrupt:
        client.cancel(spec.job)
        client.poll(0.05)
        if player is not None:
            player.close()
        return exits.INTERRUPTED
    finally:
        client.close()


def _finish(ev, out_path: Path | None, player, t_start: float, t_first: float | None, verbose: bool,
            player_error: str | None) -> int:
    from cosy.audio import write_atomic

    if out_path is not None:
        try:
            write_atomic(out_path, ev.audio, ev.sample_rate)
        except OSError as exc:
            exits.fail(f"cannot write {out_path}: {exc.strerror or exc}", exits.JOB_FAILED)
    if player is not None:
        player.finish()
        player.wait(timeout=ev.samples / ev.sample_rate + 5)
        player.close()
    seconds = ev.samples / ev.sample_rate
    if verbose:
        ttfa = (t_first - t_start) * 1000 if t_first else float("nan")
        total = time.perf_counter() - t_start
        extra = f", {player.underruns} underruns" if player is not None else ""
        print(f"cosy: first audio {ttfa:.0f} ms after start, {seconds:.2f} s of audio at {ev.sample_rate} Hz, "
              f"worker {ev.done.worker} (attempt {ev.done.attempt}, ttfc {ev.done.ttfc_ms:.0f} ms, "
              f"rtf {ev.done.rtf:.3f}), total {total:.2f} s{extra}", file=sys.stderr)
    return exits.OK
