"""`cosy grpc`: the official CosyVoice runtime's gRPC service in front of the broker (grpc.aio).

Services, on one port (50051 by default):

- ``cosyvoice.CosyVoice/Inference(Request) returns (stream Response)``: the official service, wire-compatible
  (gateways/proto/cosyvoice.proto). Each request is one broker job (:mod:`cosy.gateways.runtime` maps the four
  modes); each ``Response.tts_audio`` is a piece of signed 16-bit little-endian mono PCM at the model's rate, sent
  as the worker produces it. The rate is in the initial metadata (``x-sample-rate``) for clients that read it.
- ``grpc.health.v1.Health``: SERVING while the broker answers and at least one worker is connected, NOT_SERVING
  otherwise; for the whole server (``""``) and for ``cosyvoice.CosyVoice``. ``cosy.Status`` is SERVING while the
  broker answers. It needs no key, so probes (grpc_health_probe, Kubernetes) work as they are.
- ``cosy.Status/Get``: the queue and every worker, with its GPU figures or ``no_gpu`` (gateways/proto/
  cosy_status.proto).

Errors are gRPC statuses (:data:`GRPC_STATUS`) with a message that says what to do, and the trailing metadata
``cosy-error`` carries cosy's code (``CANNOT_CLONE``, ``UNKNOWN_VOICE``...). Everything that fails before the
first audio ends the call with no response; what fails after it ends the call with an error status after the
audio already sent, never a short success. A client that cancels (or whose deadline passes) cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cosy import protocol as P
from cosy.endpoints import Endpoints
from cosy.gateways import jobstream as js
from cosy.gateways import runtime as rt
from cosy.gateways.bridge import BrokerBridge, GatewayError
from cosy.gateways.grpc_status import status_reply
from cosy.gateways.proto import cosy_status_pb2 as spb
from cosy.gateways.proto import cosyvoice_pb2 as pb

log = logging.getLogger("cosy.grpc")

API = "grpc"
SERVICE = "cosyvoice.CosyVoice"
STATUS_SERVICE = "cosy.Status"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_MESSAGE = 4 << 20  # gRPC's default; a prompt over 30 s (960,000 bytes) is refused by cosy below that
HEALTH_EVERY_S = 0.5

GRPC_STATUS = {
    rt.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    rt.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    rt.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    rt.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    rt.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    rt.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    rt.CANCELLED: grpc.StatusCode.CANCELLED,
    rt.ABORTED: grpc.StatusCode.ABORTED,
    rt.INTERNAL: grpc.StatusCode.INTERNAL,
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class GrpcConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    api_key: str | None = None  # required as 'authorization: Bearer KEY' metadata (not by the health service)
    timeout_s: float = 60.0  # longest wait for the first audio, and between two chunks
    priority: str = P.INTERACTIVE
    split: bool = True  # long texts as sentence jobs across the workers (gateways/segments.py)
    grace_s: float = 5.0  # on SIGTERM, open calls get this long to finish
    metrics_port: int | None = None  # Prometheus on 127.0.0.1:PORT/metrics (needs prometheus-client)


class ListenError(RuntimeError):
    """The server cannot listen on the address asked for."""


@dataclass(frozen=True)
class Malformed:
    """What the request deserializer gives for bytes that are no cosyvoice.Request."""

    reason: str


def parse_request(data: bytes) -> pb.Request | Malformed:
    try:
        return pb.Request.FromString(data)
    except DecodeError as exc:
        return Malformed(str(exc) or "undecodable")


def runtime_request(request: pb.Request) -> rt.RuntimeRequest:
    """The official request as cosy's mode-neutral one; INVALID when it has no payload."""
    which = request.WhichOneof("RequestPayload")
    if which == "sft_request":
        r = request.sft_request
        return rt.RuntimeRequest("sft", r.tts_text, spk_id=r.spk_id)
    if which == "zero_shot_request":
        z = request.zero_shot_request
        return rt.RuntimeRequest("zero_shot", z.tts_text, prompt_text=z.prompt_text, prompt_audio=z.prompt_audio)
    if which == "cross_lingual_request":
        c = request.cross_lingual_request
        return rt.RuntimeRequest("cross_lingual", c.tts_text, prompt_audio=c.prompt_audio)
    if which == "instruct_request":
        i = request.instruct_request
        return rt.RuntimeRequest("instruct", i.tts_text, spk_id=i.spk_id, instruct=i.instruct_text)
    raise rt.RuntimeRequestError(rt.INVALID, "the request has none of sft_request, zero_shot_request, "
                                             "cross_lingual_request, instruct_request", "EMPTY_REQUEST")


class GrpcGateway:
    """The servicers of one `cosy grpc` process and the broker bridge they share."""

    def __init__(self, endpoints: Endpoints, config: GrpcConfig, metrics: Any = None) -> None:
        self.endpoints = endpoints
        self.config = config
        self.metrics = metrics  # a cosy.metrics.GatewayMetrics, or None
        self.bridge = BrokerBridge(endpoints)
        self.health = health.aio.HealthServicer()
        if metrics is not None:
            metrics.broker.source = lambda: (self.bridge.snapshot().status, self.bridge.broker_up)

    def register(self, server: grpc.aio.Server) -> None:
        inference = grpc.unary_stream_rpc_method_handler(
            self.inference, request_deserializer=parse_request, response_serializer=pb.Response.SerializeToString)
        get = grpc.unary_unary_rpc_method_handler(
            self.status, request_deserializer=spb.StatusRequest.FromString,
            response_serializer=spb.StatusReply.SerializeToString)
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(SERVICE, {"Inference": inference}),
            grpc.method_handlers_generic_handler(STATUS_SERVICE, {"Get": get}),
        ))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

    # --- the calls ------------------------------------------------------------------------------

    async def inference(self, request: pb.Request | Malformed,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Response]:
        await self._authorize(context)
        stream: js.JobStream | None = None
        try:
            if isinstance(request, Malformed):
                raise rt.RuntimeRequestError(rt.INVALID, f"the request is not a valid cosyvoice.Request "
                                                         f"({request.reason})", "MALFORMED_REQUEST")
            stream = await self._open(runtime_request(request))
            rate = await stream.start()
            await context.send_initial_metadata((("x-sample-rate", str(rate)), ("x-cosy-job", stream.job)))
            async with contextlib.aclosing(stream.audio()) as chunks:
                async for data in chunks:
                    yield pb.Response(tts_audio=data)
            self._count("OK")
        except rt.RuntimeRequestError as err:
            await self._abort(context, err)
        except js.JobError as err:  # StreamAborted too: the audio sent cannot be completed
            await self._abort(context, rt.RuntimeRequestError.from_job(err))
        finally:
            if stream is not None and stream.cancel():  # the client went away (or its deadline passed)
                log.info("job %s: the client went away after %d samples; cancelled", stream.job,
                         stream.samples_sent)
                if self.metrics is not None:
                    self.metrics.disconnects.labels(API).inc()

    async def status(self, request: spb.StatusRequest, context: grpc.aio.ServicerContext) -> spb.StatusReply:
        await self._authorize(context)
        try:
            snap = await self.bridge.status()
        except GatewayError as exc:
            await self._abort(context, rt.RuntimeRequestError(rt.UNAVAILABLE, str(exc), js.BROKER_UNREACHABLE))
            raise  # not reached: abort raises
        self._count("OK")
        return status_reply(snap.status or {}, self.bridge.broker_up)

    async def _open(self, request: rt.RuntimeRequest) -> js.JobStream:
        request.validate()  # bad input is INVALID_ARGUMENT whatever the broker's state
        try:
            snap = await self.bridge.status()
        except GatewayError as exc:
            raise rt.RuntimeRequestError(rt.UNAVAILABLE, str(exc), js.BROKER_UNREACHABLE) from None
        spec = request.job_spec(snap, self.config.priority, prefix="grpc")
        return await js.open_stream(self.bridge, spec, timeout_s=self.config.timeout_s, split=self.config.split,
                                    metrics=self.metrics, api=API)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.config.api_key:
            return
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        if not rt.bearer_ok(str(metadata.get("authorization", "")), self.config.api_key):
            self._count("UNAUTHENTICATED")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send the metadata 'authorization: Bearer KEY'")

    async def _abort(self, context: grpc.aio.ServicerContext, err: rt.RuntimeRequestError) -> None:
        code = GRPC_STATUS[err.kind]
        self._count(code.name)
        if err.kind not in (rt.INVALID, rt.NOT_FOUND, rt.CANCELLED):
            log.warning("%s (%s): %s", code.name, err.code, err.message)
        await context.abort(code, err.message, trailing_metadata=(("cosy-error", err.code),))

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(API, status).inc()

    # --- health -------------------------------------------------------------------------------

    async def not_serving(self) -> None:
        """Every service NOT_SERVING (the health servicer starts with "" SERVING): until the broker answers."""
        for name in ("", SERVICE, STATUS_SERVICE):
            await self.health.set(name, NOT_SERVING)

    async def watch_health(self, every_s: float = HEALTH_EVERY_S) -> None:
        """Keep the health service's answers in step with the broker's status."""
        last: tuple[int, int] | None = None
        while True:
            try:
                snap = await self.bridge.status()
                broker, workers = SERVING, SERVING if snap.workers else NOT_SERVING
            except GatewayError:
                broker, workers = NOT_SERVING, NOT_SERVING
            except Exception:  # a bug here must not leave a stale SERVING behind
                log.exception("health: cannot read the broker's status")
                broker, workers = NOT_SERVING, NOT_SERVING
            if (broker, workers) != last:
                for name in ("", SERVICE):
                    await self.health.set(name, workers)
                await self.health.set(STATUS_SERVICE, broker)
                if last is not None:
                    log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(workers))
                last = (broker, workers)
            await asyncio.sleep(every_s)


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(endpoints: Endpoints, config: GrpcConfig) -> None:
    """Run until SIGTERM or SIGINT, then give open calls ``grace_s`` and stop."""
    metrics = None
    if config.metrics_port:
        from cosy.metrics import GatewayMetrics
        from cosy.metrics import serve as serve_metrics

        metrics = GatewayMetrics()
        serve_metrics(metrics.registry, config.metrics_port)
    gw = GrpcGateway(endpoints, config, metrics)
    # No SO_REUSEPORT: a second server on the same port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
    gw.register(server)
    address = listen_address(config.host, config.port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {address}: {exc}") from None
    if not bound:
        raise ListenError(f"cannot listen on {address} (in use?)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw.bridge.start()
    await gw.not_serving()
    await server.start()
    watcher = asyncio.create_task(gw.watch_health(), name="cosy grpc health")
    log.info("cosy grpc on %s (broker %s)", address, endpoints.front)
    try:
        await stop.wait()
        log.info("stopping: open calls get %g s", config.grace_s)
        await gw.health.enter_graceful_shutdown()
        await server.stop(config.grace_s)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        gw.bridge.stop()


def run_grpc(endpoints: Endpoints, config: GrpcConfig) -> int:
    asyncio.run(serve(endpoints, config))
    return 0
