"""`cosy grpc`: the official CosyVoice runtime's gRPC service, driven by a client generated with grpcio-tools.

The client comes from tests/grpc_official/cosyvoice.proto (the official proto's wire format, written for these
tests) as a user of the official runtime generates it; the standard health service is asked with grpcio-health-
checking's own stubs, cosy.Status with the package's generated ones. A real broker, real workers (Piper for speech,
the tone engine for exact lengths and timing) and the gateway run as processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from stack import Stack, transcribe, wait_for
from test_http_gateway import FAST_TONE, FOX, FOX_WORDS, LONG_TEXT, TONE, TONE_RATE, ChunkObserver, free_port

from cosy import protocol as P
from cosy.segments import split_text

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")
pytest.importorskip("grpc_health")

from grpc_stubs import (  # noqa: E402
    NOT_SERVING,
    OFFICIAL_COPY,
    OURS,
    SERVING,
    GrpcProcess,
    generate_client,
    wire_format,
)

from cosy.gateways.proto import cosy_status_pb2  # noqa: E402

COSY = (sys.executable, "-m", "cosy")
API_KEY = "grpc-key-123"
METHOD = "/cosyvoice.CosyVoice/Inference"


def tone_samples(text: str) -> int:
    """The tone engine's length rule (workers/engines/tone.py): ms_per_char of audio per character."""
    return max(1, int(len(text) * TONE["ms_per_char"] / 1000 * TONE_RATE))


def prompt(seconds: float, rate: int = P.PROMPT_RATE) -> bytes:
    """A prompt as the official client sends it: 16 kHz int16 PCM bytes (here a 190 Hz tone)."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 190 * t)).astype("<i2").tobytes()


@dataclass
class Reply:
    audio: np.ndarray
    rate: int
    job: str
    responses: int
    first_at: float  # time.monotonic() when the first response arrived


def infer(gw: GrpcProcess, pb: ModuleType, pbg: ModuleType, request: Any, metadata: tuple = ()) -> Reply:
    call = pbg.CosyVoiceStub(gw.channel).Inference(request, timeout=60, metadata=metadata)
    parts: list[bytes] = []
    first_at = 0.0
    for response in call:
        if not parts:
            first_at = time.monotonic()
        parts.append(response.tts_audio)
    head = dict(call.initial_metadata())
    audio = np.frombuffer(b"".join(parts), dtype="<i2")
    return Reply(audio, int(head["x-sample-rate"]), head["x-cosy-job"], len(parts), first_at)


def rpc_error(fn: Any) -> Any:
    """The grpc.RpcError that fn() raises (fn consumes a streaming call)."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def cosy_error(err: Any) -> str:
    return dict(err.trailing_metadata() or ()).get("cosy-error", "")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """cosyvoice_pb2 and cosyvoice_pb2_grpc, generated from the official proto's copy."""
    return generate_client(tmp_path_factory.mktemp("official-stubs"))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Stack, GrpcProcess]]:
    """A broker with a Piper worker (voice joe) and a slow tone worker (voice tone), and `cosy grpc`."""
    s = Stack()
    try:
        s.start_broker()
        s.start_worker("piper", name="piper-0")
        s.start_worker("tone", name="tone-0", options=TONE)
        yield s, GrpcProcess(s).start().wait_serving()
    finally:
        s.stop()


# --- the proto ----------------------------------------------------------------------------------


def test_our_proto_has_the_official_wire_format(tmp_path: Path) -> None:
    ours, official = wire_format(OURS, tmp_path / "ours"), wire_format(OFFICIAL_COPY, tmp_path / "official")
    assert ours == official
    # What the official runtime's clients depend on, spelled out (so that both files drifting together fails too).
    assert ours["package"] == "cosyvoice" and ours["syntax"] == "proto3"
    assert ours["services"] == {"CosyVoice": [("Inference", ".cosyvoice.Request", ".cosyvoice.Response", False,
                                               True)]}
    payload = {number: (name, kind) for number, name, _t, _l, kind, _o in ours["messages"]["Request"]}
    assert payload == {1: ("sft_request", ".cosyvoice.sftRequest"),
                       2: ("zero_shot_request", ".cosyvoice.zeroshotRequest"),
                       3: ("cross_lingual_request", ".cosyvoice.crosslingualRequest"),
                       4: ("instruct_request", ".cosyvoice.instructRequest")}
    assert {o for *_, o in ours["messages"]["Request"]} == {"RequestPayload"}
    fields = {m: [(n, name) for n, name, *_ in f] for m, f in ours["messages"].items()}
    assert fields["sftRequest"] == [(1, "spk_id"), (2, "tts_text")]
    assert fields["zeroshotRequest"] == [(1, "tts_text"), (2, "prompt_text"), (3, "prompt_audio")]
    assert fields["crosslingualRequest"] == [(1, "tts_text"), (2, "prompt_audio")]
    assert fields["instructRequest"] == [(1, "tts_text"), (2, "spk_id"), (3, "instruct_text")]
    assert fields["Response"] == [(1, "tts_audio")]


def test_generate_script_reproduces_the_committed_modules(tmp_path: Path) -> None:
    """scripts/gen-grpc.sh run on a copy of the tree gives the committed generated modules byte for byte."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "tree"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "gen-grpc.sh", copy / "scripts")
    shutil.copytree(root / "gateways" / "proto", copy / "gateways" / "proto",
                    ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    proc = subprocess.run(["bash", str(copy / "scripts" / "gen-grpc.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = sorted(p.name for p in (copy / "gateways" / "proto").glob("*_pb2*"))
    assert generated == sorted(p.name for p in (root / "gateways" / "proto").glob("*_pb2*")) and len(generated) == 6
    for name in generated:
        assert (copy / "gateways" / "proto" / name).read_bytes() == (root / "gateways" / "proto" / name).read_bytes()


# --- speech --------------------------------------------------------------------------------------


def test_generated_client_streams_intelligible_sft_speech(served, stubs) -> None:
    _, gw = served
    pb, pbg = stubs
    reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="joe", tts_text=FOX)))
    assert reply.rate == 22050 and reply.job.startswith("grpc-")
    assert 1.5 <= len(reply.audio) / reply.rate <= 6.0
    heard = set(transcribe(reply.audio, reply.rate).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_responses_stream_as_the_worker_produces_them(served, stubs) -> None:
    stack, gw = served
    pb, pbg = stubs
    observer = ChunkObserver(stack)
    try:
        text = "x" * 150  # 3 s of audio in 30 chunks, one every 100 ms: slack for a loaded machine
        reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text=text)))
        t_final, final = wait_for(lambda: observer.final(reply.job), 10, "the job's final chunk")
        assert reply.first_at < t_final  # the client had audio before the worker made its last chunk
        assert reply.responses >= 15  # one Response per chunk, not one at the end
        assert reply.rate == TONE_RATE and len(reply.audio) == final.total_samples == tone_samples(text)
    finally:
        observer.close()
    spectrum = np.abs(np.fft.rfft(reply.audio.astype(np.float32)))
    assert abs(np.argmax(spectrum) * reply.rate / len(reply.audio) - 440) < 10  # it is the tone


def test_a_long_input_is_sentence_jobs_across_two_workers_in_order(bare_stack: Stack, stubs) -> None:
    from cosy.workers.engines import SynthesisRequest
    from cosy.workers.engines.tone import ToneEngine

    s = bare_stack
    pb, pbg = stubs
    s.start_broker()
    for name in ("tone-a", "tone-b"):
        s.start_worker("tone", name=name, options=FAST_TONE)
    gw = GrpcProcess(s).start().wait_serving()
    reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text=LONG_TEXT)))
    engine = ToneEngine(**FAST_TONE)
    parts = split_text(LONG_TEXT)
    assert len(parts) >= 2
    expected = np.concatenate([np.concatenate(list(engine.synthesize(SynthesisRequest(p, "tone")))) for p in parts])
    assert len(reply.audio) == len(expected) and np.array_equal(reply.audio, expected)
    done = {w["name"]: w["jobs_done"] for w in s.status()["workers"]}
    assert done["tone-a"] >= 1 and done["tone-b"] >= 1 and sum(done.values()) == len(parts), done


def test_client_cancel_cancels_the_job(served, stubs) -> None:
    stack, gw = served
    pb, pbg = stubs
    before = stack.status()["counters"]
    call = pbg.CosyVoiceStub(gw.channel).Inference(
        pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text="v" * 500)), timeout=60)  # 10 s to make
    next(call)
    call.cancel()
    wait_for(lambda: stack.status()["counters"]["cancelled"] > before["cancelled"], 15, "the job to be cancelled")
    assert stack.status()["counters"]["done"] == before["done"]


# --- cloning and instruct on a stack that has neither ----------------------------------------


@pytest.mark.parametrize("mode", ["zero_shot", "cross_lingual"])
def test_a_prompt_without_a_cloning_worker_is_failed_precondition(served, stubs, mode: str) -> None:
    _, gw = served
    pb, pbg = stubs
    if mode == "zero_shot":
        request = pb.Request(zero_shot_request=pb.zeroshotRequest(tts_text="Hello.", prompt_text="Its words.",
                                                                  prompt_audio=prompt(2)))
    else:
        request = pb.Request(cross_lingual_request=pb.crosslingualRequest(tts_text="Hello.", prompt_audio=prompt(2)))
    err = rpc_error(lambda: infer(gw, pb, pbg, request))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cosyvoice" in err.details() and cosy_error(err) == P.CANNOT_CLONE


def test_instruct_for_a_voice_without_instruct_mode_is_failed_precondition(served, stubs) -> None:
    _, gw = served
    pb, pbg = stubs
    request = pb.Request(instruct_request=pb.instructRequest(tts_text="Hi.", spk_id="joe", instruct_text="Whisper."))
    err = rpc_error(lambda: infer(gw, pb, pbg, request))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "piper" in err.details() and "cosyvoice" in err.details()


# --- bad input ---------------------------------------------------------------------------------


def _bad_requests(pb: ModuleType) -> dict[str, tuple[Any, Any, str]]:
    """name -> (request, the status, a word the message must have)."""
    zs = pb.zeroshotRequest
    return {
        "unknown spk_id": (pb.Request(sft_request=pb.sftRequest(spk_id="alloy", tts_text="Hi.")),
                           grpc.StatusCode.NOT_FOUND, "joe"),
        "empty text": (pb.Request(sft_request=pb.sftRequest(spk_id="joe", tts_text=" ")),
                       grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        "text too long": (pb.Request(sft_request=pb.sftRequest(spk_id="joe", tts_text="a" * (P.MAX_TEXT_CHARS + 1))),
                          grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        "no payload": (pb.Request(), grpc.StatusCode.INVALID_ARGUMENT, "sft_request"),
        "prompt over 30 s": (pb.Request(zero_shot_request=zs(tts_text="Hi.", prompt_text="w", prompt_audio=prompt(31))),
                             grpc.StatusCode.INVALID_ARGUMENT, "30 s"),
        "prompt under 0.5 s": (pb.Request(zero_shot_request=zs(tts_text="Hi.", prompt_text="w",
                                                               prompt_audio=prompt(0.2))),
                               grpc.StatusCode.INVALID_ARGUMENT, "0.5"),
        "odd prompt bytes": (pb.Request(zero_shot_request=zs(tts_text="Hi.", prompt_text="w",
                                                             prompt_audio=prompt(1) + b"\0")),
                             grpc.StatusCode.INVALID_ARGUMENT, "16-bit"),
        "zero-shot without its words": (pb.Request(zero_shot_request=zs(tts_text="Hi.", prompt_audio=prompt(1))),
                                        grpc.StatusCode.INVALID_ARGUMENT, "cross_lingual"),
        "no prompt": (pb.Request(cross_lingual_request=pb.crosslingualRequest(tts_text="Hi.")),
                      grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        "empty instruction": (pb.Request(instruct_request=pb.instructRequest(tts_text="Hi.", spk_id="joe")),
                              grpc.StatusCode.INVALID_ARGUMENT, "instruct_text"),
    }


def test_bad_requests_get_clear_statuses_and_the_gateway_keeps_serving(served, stubs) -> None:
    _, gw = served
    pb, pbg = stubs
    for name, (request, code, word) in _bad_requests(pb).items():
        err = rpc_error(lambda request=request: infer(gw, pb, pbg, request))
        assert err.code() == code, (name, err.code(), err.details())
        assert word in err.details(), (name, err.details())
        assert cosy_error(err), name
    text = "still serving"
    reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text=text)))
    assert len(reply.audio) == tone_samples(text)


def test_malformed_protobuf_is_invalid_argument(served, stubs) -> None:
    _, gw = served
    pb, pbg = stubs
    raw = gw.channel.unary_stream(METHOD)  # no serializers: the bytes go as they are
    for garbage in (b"\xff\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\x12\x04\xc3\x28\xff\xfe"):  # bad tag, short
        err = rpc_error(lambda garbage=garbage: list(raw(garbage, timeout=10)))  # field, invalid UTF-8
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, err.details())
        assert "not a valid cosyvoice.Request" in err.details()
    big = gw.channel.unary_stream(METHOD)
    err = rpc_error(lambda: list(big(b"\x0a" + b"\xff" * (5 << 20), timeout=10)))  # over gRPC's 4 MiB
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    text = "after garbage"
    reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text=text)))
    assert len(reply.audio) == tone_samples(text)


# --- health and status ------------------------------------------------------------------------------


def test_status_call_lists_workers_queue_and_no_gpu(served) -> None:
    _, gw = served
    reply = gw.status()
    assert reply.broker_up and reply.broker_version
    assert {w.name: w.engine for w in reply.workers} == {"piper-0": "piper", "tone-0": "tone"}
    assert sorted(reply.voices) == ["joe", "tone"]
    for worker in reply.workers:
        assert worker.WhichOneof("accelerator") == "no_gpu" and worker.no_gpu == "no GPU"  # CPU engines
        assert worker.capacity >= 1 and worker.sample_rate == 22050 and worker.state in ("idle", "busy")
        assert not worker.clone
    assert reply.queue.interactive == 0 and reply.queue.bulk == 0


def test_status_reply_carries_the_gpu_figures_of_a_heartbeat() -> None:
    """A worker on a GPU reports NVML figures in its heartbeats (cosy.gpu.GpuMonitor's keys): they become Gpu."""
    from cosy.gateways.grpc_status import status_reply

    metrics = {"gpu_name": "NVIDIA H100", "gpu_mem_used_mb": 8123.5, "gpu_mem_total_mb": 81559.0,
               "gpu_util_pct": 37.0, "gpu_temp_c": 54.0, "jobs_done": 3}  # this board reports no power
    status = {"broker": {"version": "0.1.0"}, "queue": {"interactive": 2, "bulk": 5}, "running": 3,
              "voices": ["a"], "workers": [{"name": "gpu0", "engine": "cosyvoice", "voices": ["a"], "clone": True,
                                            "capacity": 8, "running": 3, "metrics": metrics},
                                           {"name": "cpu", "engine": "piper", "metrics": {}}]}
    reply = cosy_status_pb2.StatusReply.FromString(status_reply(status, True).SerializeToString())
    gpu0, cpu = reply.workers
    assert gpu0.WhichOneof("accelerator") == "gpu" and gpu0.gpu.name == "NVIDIA H100"
    assert gpu0.gpu.memory_used_mb == 8123.5 and gpu0.gpu.memory_total_mb == 81559.0
    assert gpu0.gpu.utilization_pct == 37.0 and gpu0.gpu.temperature_c == 54.0
    assert not gpu0.gpu.HasField("power_w")  # absent, not 0 W
    assert gpu0.clone and gpu0.running == 3
    assert cpu.WhichOneof("accelerator") == "no_gpu"
    assert (reply.queue.interactive, reply.queue.bulk, reply.queue.running) == (2, 5, 3)


def test_health_is_serving_with_workers_and_not_serving_without(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    gw = GrpcProcess(s).start()
    wait_for(lambda: gw.health() == NOT_SERVING, 20, "NOT_SERVING with no worker")
    # The broker answers (its first status may come after the gateway already says NOT_SERVING overall).
    wait_for(lambda: gw.health("cosy.Status") == SERVING, 20, "cosy.Status SERVING once the broker answers")
    worker = s.start_worker("tone", name="tone-h", options=TONE)
    gw.wait_serving()
    assert gw.health("cosyvoice.CosyVoice") == SERVING
    err = rpc_error(lambda: gw.health("no.such.Service"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    s.kill(worker, signal.SIGTERM)
    wait_for(lambda: gw.health() == NOT_SERVING, 20, "NOT_SERVING once the worker left")
    assert gw.health("cosyvoice.CosyVoice") == NOT_SERVING
    s.kill(s.broker, signal.SIGKILL)  # type: ignore[arg-type]
    wait_for(lambda: gw.health("cosy.Status") == NOT_SERVING, 20, "NOT_SERVING for cosy.Status without a broker")
    err = rpc_error(gw.status)
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_no_workers_is_unavailable(bare_stack: Stack, stubs) -> None:
    s = bare_stack
    pb, pbg = stubs
    s.start_broker()
    gw = GrpcProcess(s).start()
    err = rpc_error(lambda: infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="", tts_text="Hi."))))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "no workers" in err.details()


# --- the process: CURVE, keys, addresses, signals ---------------------------------------------------


def test_grpc_gateway_serves_over_curve(bare_stack: Stack, tmp_path: Path, stubs) -> None:
    from test_gateway_curve import curve_stack, gateway_args, worker_joined

    s = bare_stack
    pb, pbg = stubs
    url, d = curve_stack(s, tmp_path)
    wait_for(lambda: worker_joined(s, url, d["client"]), 60, "the worker to join over CURVE", interval=0.2)
    gw = GrpcProcess(s, gateway_args(url, d["client"])).start().wait_serving()
    reply = infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text="over curve")))
    assert reply.rate == TONE_RATE and len(reply.audio) == tone_samples("over curve")
    assert [w.name for w in gw.status().workers] == ["remote"]
    stranger = GrpcProcess(s, gateway_args(url, d["stranger"])).start()  # keys the broker does not let in
    assert stranger.health() == NOT_SERVING
    err = rpc_error(lambda: infer(stranger, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone",
                                                                                          tts_text="let me in"))))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and cosy_error(err) == "BROKER_UNREACHABLE"


def test_metrics_port_counts_requests_by_status(bare_stack: Stack, stubs) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    s = bare_stack
    pb, pbg = stubs
    s.start_broker()
    s.start_worker("tone", options=TONE)
    metrics_port = free_port()
    gw = GrpcProcess(s, ["--metrics-port", str(metrics_port)]).start().wait_serving()
    infer(gw, pb, pbg, pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text="counted")))
    rpc_error(lambda: infer(gw, pb, pbg, pb.Request()))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for family in text_string_to_metric_families(text) for m in family.samples}
    assert samples[("cosy_gateway_requests_total", (("api", "grpc"), ("status", "OK")))] == 1
    assert samples[("cosy_gateway_requests_total", (("api", "grpc"), ("status", "INVALID_ARGUMENT")))] == 1
    assert samples[("cosy_gateway_audio_seconds_total", (("api", "grpc"),))] == pytest.approx(
        tone_samples("counted") / TONE_RATE, abs=1e-3)


def test_api_key_is_required_but_health_stays_open(bare_stack: Stack, stubs) -> None:
    s = bare_stack
    pb, pbg = stubs
    s.start_broker()
    s.start_worker("tone", options=TONE)
    gw = GrpcProcess(s, ["--api-key", API_KEY]).start().wait_serving()  # health needs no key
    request = pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text="keyed"))
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        err = rpc_error(lambda metadata=metadata: infer(gw, pb, pbg, request, metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(gw.status).code() == grpc.StatusCode.UNAUTHENTICATED
    key = (("authorization", f"Bearer {API_KEY}"),)
    assert len(infer(gw, pb, pbg, request, key).audio) == tone_samples("keyed")
    assert gw.status(key).broker_up


def test_the_command_imports_grpc_only_when_it_runs() -> None:
    code = ("import sys\nfrom cosy.cli.main import app\n"
            "print(' '.join(m for m in ('grpc', 'google.protobuf', 'cosy.gateways.grpc') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    assert "grpc" in subprocess.run([*COSY, "--help"], capture_output=True, text=True, timeout=30).stdout


def test_non_loopback_without_a_key_is_refused(bare_stack: Stack) -> None:
    s = bare_stack
    proc = subprocess.run([*COSY, "grpc", "--host", "0.0.0.0", "--port", str(free_port()), "--runtime-dir",
                           str(s.runtime_dir)], env={**s.env, "COSY_API_KEY": ""}, capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"--api-key" in proc.stderr and b"--allow-remote" in proc.stderr


def test_a_port_in_use_is_an_error_not_a_shared_port(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    first = GrpcProcess(s).start()
    proc = subprocess.run([*COSY, "grpc", "--port", str(first.port), "--runtime-dir", str(s.runtime_dir)],
                          env=s.env, capture_output=True, timeout=30)
    assert proc.returncode == 1 and b"cannot listen" in proc.stderr, proc.stderr


def test_sigterm_stops_cleanly_and_cancels_open_calls(bare_stack: Stack, stubs) -> None:
    s = bare_stack
    pb, pbg = stubs
    s.start_broker()
    s.start_worker("tone", options=TONE)
    gw = GrpcProcess(s).start().wait_serving()
    call = pbg.CosyVoiceStub(gw.channel).Inference(
        pb.Request(sft_request=pb.sftRequest(spk_id="tone", tts_text="v" * 1500)), timeout=60)  # 30 s to make
    next(call)
    assert gw.stop() == 0
    assert "stopping" in s.log_text()
    with pytest.raises(grpc.RpcError):
        for _ in call:
            pass
    wait_for(lambda: s.status()["running"] == 0, 15, "the open call's job to be cancelled")
    assert s.status()["counters"]["done"] == 0
