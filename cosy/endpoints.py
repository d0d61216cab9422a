"""Where the broker listens and where clients and workers connect.

Default: ipc sockets in a runtime directory that only the owner (and, under
systemd, the ``cosy`` group) can enter. ``--bind/--connect tcp://HOST:PORT``
uses four consecutive ports: front, back, audio-in, audio-out.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

IPC_PATH_MAX = 107  # sun_path on Linux, minus the terminating NUL


def is_loopback(host: str, resolve: bool = False) -> bool:
    """Whether a listening or connecting host is this machine only: localhost, 127.0.0.0/8, ::1 (brackets
    allowed). With ``resolve``, another name counts when it resolves to a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if not resolve:
            return False
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def default_runtime_dir() -> Path:
    env = os.environ.get("COSY_RUNTIME_DIR")
    if env:
        return Path(env)
    # systemd's RuntimeDirectory=cosy sets RUNTIME_DIRECTORY=/run/cosy for the units.
    sd = os.environ.get("RUNTIME_DIRECTORY")
    if sd:
        return Path(sd.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "cosy"
    if Path("/run/cosy").is_dir() and os.access("/run/cosy", os.W_OK | os.X_OK):
        return Path("/run/cosy")
    return Path(f"/tmp/cosy-{os.getuid()}")


def ensure_runtime_dir(path: Path, group_shared: bool = False) -> Path:
    """Create the runtime dir with owner-only (or owner+group) permissions and refuse a foreign one."""
    path = Path(path)
    mode = 0o770 if group_shared else 0o700
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    st = path.stat()
    if st.st_uid != os.getuid() and os.getuid() != 0:
        raise PermissionError(f"runtime directory {path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o007:
        os.chmod(path, st.st_mode & ~0o007 & 0o7777)
    return path


class EndpointError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoints:
    front: str
    back: str
    audio_in: str
    audio_out: str
    runtime_dir: Path | None = None
    curve_dir: Path | None = None  # CURVE keys for tcp endpoints (cosy.security)

    @property
    def secure(self) -> bool:
        return self.is_tcp and self.curve_dir is not None

    @property
    def is_tcp(self) -> bool:
        return self.front.startswith("tcp://")

    @property
    def host(self) -> str | None:
        if not self.is_tcp:
            return None
        return self.front[len("tcp://"):].rsplit(":", 1)[0].strip("[]")

    def is_loopback(self) -> bool:
        return self.host is None or is_loopback(self.host, resolve=True)

    def as_dict(self) -> dict[str, str]:
        return {"front": self.front, "back": self.back, "audio_in": self.audio_in, "audio_out": self.audio_out}


def ipc_endpoints(runtime_dir: Path) -> Endpoints:
    runtime_dir = Path(runtime_dir).absolute()
    eps = Endpoints(
        front=f"ipc://{runtime_dir}/front.sock",
        back=f"ipc://{runtime_dir}/back.sock",
        audio_in=f"ipc://{runtime_dir}/audio-in.sock",
        audio_out=f"ipc://{runtime_dir}/audio.sock",
        runtime_dir=runtime_dir,
    )
    longest = max(len(e) - len("ipc://") for e in (eps.front, eps.back, eps.audio_in, eps.audio_out))
    if longest > IPC_PATH_MAX:
        raise EndpointError(
            f"runtime directory path is too long for ipc sockets ({longest} > {IPC_PATH_MAX} characters): "
            f"use a shorter --runtime-dir"
        )
    return eps


def tcp_endpoints(url: str, runtime_dir: Path | None = None, curve_dir: Path | None = None) -> Endpoints:
    if not url.startswith("tcp://"):
        raise EndpointError(f"expected tcp://HOST:PORT, got {url!r}")
    host, _, port_s = url[len("tcp://"):].rpartition(":")
    if not host or not port_s.isdigit():
        raise EndpointError(f"expected tcp://HOST:PORT, got {url!r}")
    port = int(port_s)
    if not (1 <= port <= 65532):
        raise EndpointError(f"port {port} out of range (four consecutive ports are used)")
    return Endpoints(
        front=f"tcp://{host}:{port}",
        back=f"tcp://{host}:{port + 1}",
        audio_in=f"tcp://{host}:{port + 2}",
        audio_out=f"tcp://{host}:{port + 3}",
        runtime_dir=runtime_dir,
        curve_dir=curve_dir,
    )


def free_tcp_base(host: str = "127.0.0.1", n: int = 4) -> int:
    """A base port with n consecutive free ports on host (a tcp broker uses four), for tests and benchmarks.
    Free when checked: another process may take them before the broker binds."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on {host}")


def resolve(runtime_dir: Path | None, url: str | None, curve_dir: Path | None = None) -> Endpoints:
    rd = Path(runtime_dir) if runtime_dir else default_runtime_dir()
    if url:
        curve = curve_dir or (Path(os.environ["COSY_CURVE_DIR"]) if os.environ.get("COSY_CURVE_DIR") else None)
        return tcp_endpoints(url, rd, curve)
    return ipc_endpoints(rd)
