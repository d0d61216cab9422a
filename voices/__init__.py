"""The voice registry: reference voices for zero-shot engines (CosyVoice).

A voice is a folder ``<name>/`` holding ``voice.json`` (metadata), the reference audio
(``reference.wav``, mono, 3-30 s) and its exact transcript (in voice.json). Voices are
looked up in the user's folder first (``$COSY_VOICES_DIR``, else
``$XDG_DATA_HOME/cosy/voices``), then in the voices shipped with cosy (this folder).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cosy import diskspace

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIN_S, MAX_S = 3.0, 30.0
STORE_RATE = 24_000  # CosyVoice2/3's rate; engines resample to what they need


class VoiceError(ValueError):
    pass


class NoSpaceError(OSError):
    """A voice could not be stored for lack of space (a full disk, a quota, a read-only folder); nothing was
    added. ``str()`` is the one-line message: it names the filesystem and the voice."""

    def __init__(self, code: int | None, message: str, name: str, folder: Path) -> None:
        super().__init__(code, message)
        self.message, self.name, self.folder = message, name, folder

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Voice:
    name: str
    transcript: str
    language: str
    audio: str  # file name inside the voice folder
    sample_rate: int
    duration_s: float
    licence: str = ""
    description: str = ""
    folder: str = ""

    @property
    def audio_path(self) -> Path:
        return Path(self.folder) / self.audio


def shipped_dir() -> Path:
    return Path(__file__).resolve().parent


def user_dir() -> Path:
    env = os.environ.get("COSY_VOICES_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "cosy" / "voices"


def voice_dirs() -> list[Path]:
    return [user_dir(), shipped_dir()]


def _load(folder: Path) -> Voice | None:
    meta = folder / "voice.json"
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text())
        return Voice(**{**data, "folder": str(folder)})
    except (ValueError, TypeError):
        return None


def list_voices(dirs: list[Path] | None = None) -> list[Voice]:
    found: dict[str, Voice] = {}
    for base in dirs or voice_dirs():
        if not base.is_dir():
            continue
        for folder in sorted(base.iterdir()):
            voice = _load(folder) if folder.is_dir() and not folder.name.startswith(".") else None
            if voice is not None and voice.name not in found:
                found[voice.name] = voice
    return sorted(found.values(), key=lambda v: v.name)


def get_voice(name: str, dirs: list[Path] | None = None) -> Voice:
    for voice in list_voices(dirs):
        if voice.name == name:
            return voice
    names = ", ".join(v.name for v in list_voices(dirs)) or "none"
    raise VoiceError(f"unknown voice {name!r}; voices in the registry: {names}")


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio
    n = int(round(len(audio) * target / rate))
    return np.interp(np.arange(n) * rate / target, np.arange(len(audio)), audio).astype(np.float32)


def add_voice(name: str, audio_file: Path, transcript: str, language: str = "", licence: str = "",
              description: str = "", dest: Path | None = None, replace: bool = False) -> Voice:
    """Validate a reference recording and store it as a voice (mono, 24 kHz, 16-bit)."""
    import soundfile as sf

    check_name(name)
    if not transcript.strip():
        raise VoiceError("the transcript of the reference audio is required (--text)")
    try:
        audio, rate = sf.read(str(audio_file), dtype="float32", always_2d=True)
    except Exception as exc:
        raise VoiceError(f"cannot read {audio_file}: {exc}") from None
    return store_voice(name, audio.mean(axis=1), rate, transcript, language, licence, description, dest, replace)


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise VoiceError("a voice name is 1-64 characters of a-z 0-9 _ - (starting with a letter or digit)")


def store_voice(name: str, mono: np.ndarray, rate: int, transcript: str, language: str = "", licence: str = "",
                description: str = "", dest: Path | None = None, replace: bool = False) -> Voice:
    """Store decoded mono audio (float, -1..1) as a voice. Atomic: the voice appears whole (one rename of a
    complete folder) or not at all; on any error nothing is left behind, and a voice being replaced stays as it
    was. An empty transcript is allowed here (a voice for cross-lingual cloning: the reference's voice, not its
    words). A full disk, a quota or a read-only folder raises :class:`NoSpaceError`."""
    import soundfile as sf

    check_name(name)
    duration = len(mono) / rate if rate else 0.0
    if not MIN_S <= duration <= MAX_S:
        raise VoiceError(f"the reference is {duration:.1f} s long; it must be {MIN_S:g}-{MAX_S:g} s")
    if float(np.abs(mono).max(initial=0.0)) < 1e-3:
        raise VoiceError("the reference audio is silent")
    base = dest or user_dir()
    folder = base / name
    if folder.exists() and not replace:
        raise VoiceError(f"voice {name!r} exists in {base}; remove it first")
    stored = _resample(np.asarray(mono, dtype=np.float32), rate, STORE_RATE)
    wav = io.BytesIO()  # encoded in memory: libsndfile reports a full disk without its errno
    sf.write(wav, stored, STORE_RATE, format="WAV", subtype="PCM_16")
    voice = Voice(name=name, transcript=transcript.strip(), language=language, audio="reference.wav",
                  sample_rate=STORE_RATE, duration_s=round(len(stored) / STORE_RATE, 3), licence=licence,
                  description=description)
    meta = {k: v for k, v in asdict(voice).items() if k != "folder"}
    tag = f"{os.getpid()}.{os.urandom(4).hex()}"  # one per writer: never shared
    tmp, old = base / f".{name}.{tag}.tmp", base / f".{name}.{tag}.old"
    try:
        base.mkdir(parents=True, exist_ok=True)
        _sweep(base)
        tmp.mkdir()
        diskspace.write_file(tmp / "reference.wav", wav.getvalue())
        diskspace.write_file(tmp / "voice.json", (json.dumps(meta, indent=2) + "\n").encode())
        _move_into_place(tmp, folder, old, name, base, replace)
    except OSError as exc:
        if diskspace.is_no_space(exc):
            raise NoSpaceError(exc.errno, f"{diskspace.describe(exc, base)} writing the voice {name}; nothing was "
                               "added", name, base) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return Voice(**{**meta, "folder": str(folder)})


def _sweep(base: Path) -> None:
    """Undo what a writer killed mid-store (or mid-remove) left: its temporary or removed folder goes; a voice it
    had moved aside to replace comes back if the new one never took its place."""
    leftovers = [p for kind in ("tmp", "old", "removed") for p in sorted(base.glob(f".*.*.*.{kind}"))]
    for leftover in leftovers:
        parts = leftover.name.split(".")  # "", name, pid, tag, tmp|old|removed (names have no dots)
        if len(parts) != 5 or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        folder = base / parts[1]
        with contextlib.suppress(OSError):
            if parts[4] == "old" and not folder.exists():
                leftover.rename(folder)
            else:
                shutil.rmtree(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, folder: Path, old: Path, name: str, base: Path, replace: bool) -> None:
    """Rename the complete ``tmp`` folder to ``folder``; with ``replace``, the voice there moves aside first and
    comes back if the new one cannot take its place."""
    if replace and folder.exists():
        folder.rename(old)
        try:
            tmp.rename(folder)
        except OSError:
            old.rename(folder)
            raise
        return
    try:
        tmp.rename(folder)  # fails if another writer made the folder meanwhile
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise VoiceError(f"voice {name!r} exists in {base}; remove it first") from None
        raise


def remove_voice(name: str, dest: Path | None = None) -> None:
    folder = (dest or user_dir()) / name
    if not (folder / "voice.json").is_file():
        where = "the shipped voices" if (shipped_dir() / name / "voice.json").is_file() else "the registry"
        raise VoiceError(f"voice {name!r} is not a user voice in {dest or user_dir()} (it is in {where})")
    gone = folder.with_name(f".{name}.{os.getpid()}.{os.urandom(4).hex()}.removed")
    folder.rename(gone)  # the voice goes at once, whole; an error here (a read-only disk) changes nothing
    shutil.rmtree(gone, ignore_errors=True)  # what a crash leaves here is hidden, and swept by the next store
