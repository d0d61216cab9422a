"""gRPC helpers for the tests: a client generated with grpcio-tools, and the wire format a .proto describes.

The client is generated from tests/grpc_official/cosyvoice.proto (a stand-in for the official runtime's proto)
into a temporary folder, as a user of the official runtime does, and imported as ``cosyvoice_pb2`` /
``cosyvoice_pb2_grpc``. The test process never imports cosy's own generated ``cosy.gateways.proto.cosyvoice_pb2``:
both define ``cosyvoice.Request`` and one descriptor pool cannot hold the same name twice. cosy's status stubs
(package ``cosy``) can sit beside it.
"""

from __future__ import annotations

import importlib
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from stack import Stack, wait_for

from cosy.endpoints import free_tcp_base

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_COPY = Path(__file__).resolve().parent / "grpc_official" / "cosyvoice.proto"
OURS = ROOT / "gateways" / "proto" / "cosyvoice.proto"
COSY = (sys.executable, "-m", "cosy")
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus
NOT_SERVING = 2


def protoc(*args: str) -> None:
    from grpc_tools import protoc as _protoc

    include = str(Path(_protoc.__file__).parent / "_proto")
    code = _protoc.main(["protoc", f"-I{include}", *args])
    assert code == 0, f"protoc {' '.join(args)} exited {code}"


def generate_client(out: Path, proto: Path = OFFICIAL_COPY) -> tuple[ModuleType, ModuleType]:
    """cosyvoice_pb2 and cosyvoice_pb2_grpc generated from PROTO into OUT, imported from there."""
    out.mkdir(parents=True, exist_ok=True)
    protoc(f"-I{proto.parent}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto))
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("cosyvoice_pb2"), importlib.import_module("cosyvoice_pb2_grpc")


def wire_format(proto: Path, out: Path) -> dict[str, Any]:
    """What decides the bytes on the wire: the package, every message's fields (name, number, type, label, message
    type, oneof) and every service's methods (name, types, streaming). Comments, order and options do not count."""
    from google.protobuf import descriptor_pb2

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{proto.stem}.pb"
    protoc(f"-I{proto.parent}", f"--descriptor_set_out={target}", str(proto))
    files = descriptor_pb2.FileDescriptorSet.FromString(target.read_bytes()).file
    (fd,) = files
    messages = {}
    for m in fd.message_type:
        oneofs = [o.name for o in m.oneof_decl]
        messages[m.name] = sorted(
            (f.number, f.name, f.type, f.label, f.type_name,
             oneofs[f.oneof_index] if f.HasField("oneof_index") else None) for f in m.field)
    services = {s.name: sorted((m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                               for m in s.method) for s in fd.service}
    return {"package": fd.package, "syntax": fd.syntax, "messages": messages, "services": services}


@dataclass
class GrpcProcess:
    """`cosy grpc` as a process, stopped by PID with the rest of the stack."""

    stack: Stack
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=lambda: free_tcp_base(n=1))
    proc: subprocess.Popen | None = None
    channel: Any = None

    def start(self) -> GrpcProcess:
        log = open(self.stack.runtime_dir / f"grpc-{self.port}.log", "ab")  # noqa: SIM115
        self.stack.logs.append(Path(log.name))
        self.proc = subprocess.Popen([*COSY, "grpc", "--port", str(self.port), "--runtime-dir",
                                      str(self.stack.runtime_dir), *self.args],
                                     env=self.stack.env, stdout=log, stderr=subprocess.STDOUT)
        self.stack.procs.append(self.proc)
        wait_for(self._listening, 30, f"cosy grpc on port {self.port}")
        import grpc

        self.channel = grpc.insecure_channel(self.address)
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"cosy grpc exited with {self.proc.returncode}:\n{self.stack.log_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self, service: str = "") -> int:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def wait_serving(self) -> GrpcProcess:
        wait_for(lambda: self.health() == SERVING, 20, "cosy grpc to say SERVING")
        return self

    def status(self, metadata: tuple = ()) -> Any:
        from cosy.gateways.proto import cosy_status_pb2, cosy_status_pb2_grpc

        stub = cosy_status_pb2_grpc.StatusStub(self.channel)
        return stub.Get(cosy_status_pb2.StatusRequest(), timeout=10, metadata=metadata)

    def stop(self) -> int | None:
        """SIGTERM, as systemd stops it; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        if self.channel is not None:
            self.channel.close()
        return self.proc.returncode
