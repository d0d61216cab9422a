"""The container image and compose.yaml, built and run for real with podman.

The image is built here from a Debian base made locally with debootstrap (scripts/container-base.sh: no registry
can be reached), by scripts/container-build.sh, which tags it with a hash of everything it is made of: a second
run with nothing changed uses the image as it is, and a change to cosy's code rebuilds only the last layers.
The compose stack runs with podman-compose (the test extra) and is judged from the host: an OpenAI speech
request, a Wyoming describe, `cosy say` in a container of its own, a worker that dies and comes back, and
`podman stop` within the grace period. Every wait polls a real condition (a health check, the broker's status).

podman here needs runc, cgroupfs and no default ulimits: scripts/container-podman.sh passes them.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import soundfile as sf
import tomllib
import yaml
from stack import read_wav, transcribe, wait_for

from cosy.endpoints import free_tcp_base

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ROOT / "scripts" / "container-podman.sh"
GRACE_S = 15  # compose.yaml's stop_grace_period, and what the test gives `podman stop`
BUILD_TIMEOUT_S = 1500  # a first build on a busy 2-core machine: the Debian base, packages, wheels
FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}
IMAGE_UID = 1000  # the image's `cosy` user
# podman logs this on every start and stop where there is no systemd to run health check timers; tests run the
# checks themselves with `podman healthcheck run`.
SYSTEMD_NOISE = re.compile(r".*unable to get systemd connection.*\n?")


def cannot_run_containers() -> str | None:
    """Why podman cannot run containers on this machine, or None."""
    if os.geteuid() != 0:
        return "podman cannot run containers here: not root (the container tests use rootful podman and debootstrap)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return (f"podman cannot run containers here: {tool} is not installed "
                    "(apt-get install podman runc debootstrap)")
    return None


def quiet(text: str) -> str:
    return SYSTEMD_NOISE.sub("", text)


def podman(*args: str, timeout: float = 120, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(PODMAN), *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{quiet(proc.stderr)[-4000:]}")
    return proc


def inspect(name: str) -> dict:
    return json.loads(podman("inspect", name, timeout=30).stdout)[0]


def healthy(name: str) -> bool:
    return podman("healthcheck", "run", name, check=False, timeout=30).returncode == 0


def words(wav: bytes | Path) -> set[str]:
    if isinstance(wav, Path):
        audio, rate = read_wav(wav)
    else:
        audio, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert len(audio) / rate >= 2.0, f"only {len(audio) / rate:.2f} s of audio"
    return set(transcribe(audio, rate).split())


def out_dir(tmp_path: Path) -> Path:
    """A folder the image's user may write into when it is mounted at /out."""
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, IMAGE_UID, IMAGE_UID)
    return out


# --- without podman: the files agree with each other ------------------------------------------------------------


def test_ignore_files_are_the_same_and_keep_what_the_containerfile_copies() -> None:
    ignore = (ROOT / ".containerignore").read_text()
    assert (ROOT / ".dockerignore").read_text() == ignore
    kept = {line[1:] for line in ignore.splitlines() if line.startswith("!")}
    copied = set()
    for line in (ROOT / "Containerfile").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--from"):
            copied |= set(parts[1:-1])
    assert copied - {"Containerfile"} == kept, "the build context must hold exactly what the Containerfile copies"


def test_gpu_flavour_pins_the_revision_pixi_and_the_docs_use() -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    assert containerfile.startswith("# ") and "\nARG BASE=docker.io/library/debian:bookworm-slim\n" in containerfile
    (rev,) = re.findall(r"ARG COSYVOICE_REV=([0-9a-f]{40})", containerfile)
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    assert f"checkout {rev} " in pixi["feature"]["gpu"]["tasks"]["fetch-cosyvoice"]["cmd"]
    assert rev in (ROOT / "docs" / "gpu.md").read_text()
    assert rev in (ROOT / "docs" / "deploy.md").read_text()


def test_compose_publishes_only_the_gateways_and_only_on_loopback() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"broker", "worker", "http", "wyoming"}
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["healthcheck"]["test"] == ["CMD", "cosy-healthcheck"], name
        assert "run:/run/cosy" in svc["volumes"], name
        if name in ("broker", "worker"):
            assert "ports" not in svc and svc["network_mode"] == "none", name
        else:
            (port,) = svc["ports"]
            assert port.startswith("${COSY_BIND:-127.0.0.1}:"), port
    assert services["worker"]["deploy"]["mode"] == "replicated"
    text = (ROOT / "compose.yaml").read_text()
    for needle in ("driver: nvidia", "capabilities: [gpu]", '"--engine", "cosyvoice"', "models:/var/lib/cosy/models"):
        assert f"{needle}" in text, f"the commented GPU worker needs {needle!r}"


# --- with podman ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    reason = cannot_run_containers()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run([str(ROOT / "scripts" / "container-build.sh")], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"the image did not build:\n{quiet(proc.stderr)[-6000:]}"
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class ComposeStack:
    """compose.yaml under podman-compose, as a project of its own (its containers and volumes are its own)."""

    project: str
    env: dict[str, str]
    http_port: int
    wyoming_port: int
    api_key: str

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "podman_compose", "--podman-path", str(PODMAN),
                               "-f", str(ROOT / "compose.yaml"), "-p", self.project, *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{quiet(proc.stdout + proc.stderr)[-4000:]}\n{self.logs()}")
        return proc

    def containers(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        names = podman("ps", "-a", *filters, "--format", "{{.Names}}", timeout=30).stdout.split()
        return sorted(names)

    def volumes(self) -> list[str]:
        """Every volume the project's containers mount: the named ones and the image's anonymous ones."""
        found: set[str] = set()
        for name in self.containers():
            found |= {m["Name"] for m in inspect(name)["Mounts"] if m.get("Type") == "volume"}
        return sorted(found)

    def volume_at(self, service: str, destination: str) -> str:
        (name,) = [m["Name"] for m in inspect(self.containers(service)[0])["Mounts"]
                   if m["Destination"] == destination]
        return name

    def status(self) -> dict:
        (broker,) = self.containers("broker")
        return json.loads(podman("exec", broker, "cosy", "status", "--json", timeout=30).stdout)

    def logs(self) -> str:
        out = []
        for name in self.containers():
            proc = podman("logs", name, check=False, timeout=30)
            out.append(f"--- {name}\n{quiet(proc.stdout + proc.stderr)[-3000:]}")
        return "\n".join(out)


def _free_port() -> int:
    return free_tcp_base("127.0.0.1", 1)


@pytest.fixture(scope="module")
def compose_stack(image: str) -> Iterator[ComposeStack]:
    key = secrets.token_hex(16)
    http_port, wyoming_port = _free_port(), _free_port()
    env = {**os.environ, "COSY_IMAGE": image, "COSY_API_KEY": key, "COSY_HTTP_PORT": str(http_port),
           "COSY_WYOMING_PORT": str(wyoming_port), "COSY_WORKERS": "2", "COSY_PIPER_THREADS": "1"}
    stack = ComposeStack(f"cosytest{os.getpid()}", env, http_port, wyoming_port, key)
    volumes: list[str] = []
    try:
        stack.compose("up", "-d")
        volumes = stack.volumes()

        def all_healthy() -> bool:
            names = stack.containers()
            return len(names) == 5 and all(healthy(n) for n in names)

        try:
            wait_for(all_healthy, 180, "every container's health check to pass", interval=1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from None
        yield stack
    finally:
        volumes = sorted(set(volumes) | set(stack.volumes()))
        stack.compose("down", "-v", "-t", str(GRACE_S), check=False)
        leftover = stack.containers()
        if leftover:
            podman("rm", "-f", "-v", *leftover, check=False)
        if volumes:
            podman("volume", "rm", "-f", *volumes, check=False)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_image_runs_cosy_as_a_user_without_compilers(image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "cosy"
    assert config["Entrypoint"] == ["tini", "--", "cosy-entrypoint"] and config["Cmd"] == ["up"]
    assert {"/run/cosy", "/var/cache/cosy", "/var/lib/cosy"} <= set(config["Volumes"])
    assert info["Healthcheck"]["Test"] == ["CMD", "cosy-healthcheck"]
    assert info["Size"] < 800e6, f"the image grew to {info['Size'] / 1e6:.0f} MB"
    probe = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                   "id -u; for t in gcc cc c++ make pip pip3 git; do command -v $t || true; done").stdout.split()
    assert probe == [str(IMAGE_UID)], f"expected only the uid, got {probe}"
    # The entrypoint is cosy: its help, and its clear error and exit code without a broker.
    assert "Usage: cosy" in podman("run", "--rm", image, "--help").stdout
    proc = podman("run", "--rm", image, "status", check=False)
    assert proc.returncode == 3 and "no broker at ipc:///run/cosy/front.sock" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_say_in_a_container_of_its_own_writes_intelligible_speech(image: str, tmp_path: Path) -> None:
    out = out_dir(tmp_path)
    name = f"cosy-test-say-{os.getpid()}"
    try:
        proc = podman("run", "--rm", "--name", name, "-v", f"{out}:/out", image,
                      "say", FOX, "-o", "/out/x.wav", "--no-play", timeout=180, check=False)
    finally:
        podman("rm", "-f", name, check=False)
    assert proc.returncode == 0, quiet(proc.stderr)
    heard = words(out / "x.wav")
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_up_in_a_container_is_healthy_and_stops_on_sigterm(image: str) -> None:
    name = f"cosy-test-up-{os.getpid()}"
    try:
        podman("run", "-d", "--name", name, image, "up", "--workers", "1")
        wait_for(lambda: healthy(name), 120, "`cosy up` in a container to have a worker", interval=0.5)
        t0 = time.monotonic()
        podman("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
        took = time.monotonic() - t0
        state = inspect(name)["State"]
        logs = quiet(podman("logs", name).stderr)
        assert state["ExitCode"] == 0, logs
        assert took < GRACE_S, f"podman stop took {took:.1f} s"
        assert "broker stopped" in logs
    finally:
        podman("rm", "-f", "-v", name, check=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compose_file_passes_the_compose_tools_config_check(tmp_path: Path) -> None:
    if reason := cannot_run_containers():
        pytest.skip(reason)
    stack = ComposeStack("cosyconfig", {**os.environ, "COSY_API_KEY": "k", "COSY_WORKERS": "3"}, 0, 0, "k")
    config = yaml.safe_load(stack.compose("config").stdout)
    assert set(config["services"]) == {"broker", "worker", "http", "wyoming"}
    assert config["services"]["http"]["ports"] == ["127.0.0.1:8000:8000"]
    assert str(config["services"]["worker"]["deploy"]["replicas"]) == "3"
    # The HTTP gateway's key is required: without it the file does not resolve.
    env = {k: v for k, v in os.environ.items() if k != "COSY_API_KEY"}
    proc = ComposeStack("cosyconfig", env, 0, 0, "").compose("config", check=False)
    assert proc.returncode != 0 and "set COSY_API_KEY" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_compose_stack_serves_openai_speech_on_loopback(compose_stack: ComposeStack) -> None:
    s = compose_stack
    status = s.status()
    assert len(status["workers"]) == 2 and {w["engine"] for w in status["workers"]} == {"piper"}
    # Only the gateways publish, and only on 127.0.0.1.
    for name in s.containers():
        ports = inspect(name)["NetworkSettings"]["Ports"] or {}
        bound = [b for binds in ports.values() for b in (binds or [])]
        if "_http_" in name or "_wyoming_" in name:
            assert bound and all(b["HostIp"] == "127.0.0.1" for b in bound), (name, bound)
        else:
            assert not bound, (name, bound)
    url = f"http://127.0.0.1:{s.http_port}/v1/audio/speech"
    body = {"model": "tts-1", "input": FOX, "voice": "joe", "response_format": "wav"}
    assert httpx.post(url, json=body, timeout=60).status_code == 401  # the key is required
    resp = httpx.post(url, json=body, headers={"Authorization": f"Bearer {s.api_key}"}, timeout=120)
    assert resp.status_code == 200, resp.text
    heard = words(resp.content)
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_compose_stack_answers_a_wyoming_describe(compose_stack: ComposeStack) -> None:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async def describe() -> Info:
        async with AsyncTcpClient("127.0.0.1", compose_stack.wyoming_port, connect_timeout=10,
                                  read_timeout=30) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None and Info.is_type(event.type)
            return Info.from_event(event)

    (program,) = asyncio.run(describe()).tts
    assert program.name == "cosy" and {v.name for v in program.voices} == {"joe"}


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_say_container_on_the_stacks_runtime_volume_uses_its_broker(compose_stack: ComposeStack, image: str,
                                                                    tmp_path: Path) -> None:
    s = compose_stack
    done = sum(w["jobs_done"] for w in s.status()["workers"])
    out = out_dir(tmp_path)
    run_volume = s.volume_at("broker", "/run/cosy")
    name = f"cosy-test-say-stack-{os.getpid()}"
    try:
        proc = podman("run", "--rm", "--name", name, "--network", "none", "-v", f"{run_volume}:/run/cosy",
                      "-v", f"{out}:/out", image, "say", FOX, "-o", "/out/y.wav", "--no-play", timeout=120,
                      check=False)
    finally:
        podman("rm", "-f", name, check=False)
    assert proc.returncode == 0, quiet(proc.stderr)
    heard = words(out / "y.wav")
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"
    assert sum(w["jobs_done"] for w in s.status()["workers"]) == done + 1, "the stack's workers did not serve it"


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_worker_container_that_dies_is_restarted_and_rejoins(compose_stack: ComposeStack) -> None:
    """The worker's process is killed with SIGKILL, as the OOM killer or a crash would end it. (`podman kill` and
    `docker kill` are a user's stop: restart policies leave such a container stopped, like `podman stop`.)"""
    s = compose_stack
    worker = s.containers("worker")[0]
    before = inspect(worker)
    host = before["Config"]["Hostname"]
    assert host in {w["host"] for w in s.status()["workers"]}
    tini = before["State"]["Pid"]
    (child,) = Path(f"/proc/{tini}/task/{tini}/children").read_text().split()  # the cosy worker under tini
    os.kill(int(child), signal.SIGKILL)
    wait_for(lambda: inspect(worker)["RestartCount"] > before["RestartCount"], 60, "podman to restart the worker",
             interval=0.2)

    def rejoined() -> bool:
        logs = quiet(podman("logs", worker).stderr)
        workers = s.status()["workers"]
        return logs.count(" ready (piper") >= 2 and len(workers) == 2 and host in {w["host"] for w in workers}

    try:
        wait_for(rejoined, 90, "the restarted worker to register with the broker again", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{s.logs()}") from None
    wait_for(lambda: healthy(worker), 60, "the restarted worker's health check", interval=0.5)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_podman_stop_ends_each_service_within_the_grace_period(compose_stack: ComposeStack, image: str) -> None:
    """The last test of the stack: it stops every container, gateways and workers first, the broker last."""
    s = compose_stack
    order = s.containers("http") + s.containers("wyoming") + s.containers("worker") + s.containers("broker")
    run_volume = s.volume_at("broker", "/run/cosy")
    for name in order:
        t0 = time.monotonic()
        podman("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30)
        took = time.monotonic() - t0
        state = inspect(name)["State"]
        proc = podman("logs", name)
        logs = quiet(proc.stdout + proc.stderr)
        assert took < GRACE_S, f"podman stop {name} took {took:.1f} s"
        assert state["Status"] == "exited", name
        if "_http_" in name:
            # uvicorn shuts down, then ends itself with the signal it caught: 128 + SIGTERM, not a SIGKILL.
            assert state["ExitCode"] in (0, 128 + signal.SIGTERM) and "Finished server process" in logs, logs
        else:
            assert state["ExitCode"] == 0, f"{name} exited {state['ExitCode']}:\n{logs}"
    assert "broker stopped" in quiet(podman("logs", s.containers("broker")[0]).stderr)
    # The broker took its sockets with it (its lock file stays, unlocked): nothing stale for the next start.
    left = podman("run", "--rm", "--network", "none", "-v", f"{run_volume}:/run/cosy", "--entrypoint", "ls", image,
                  "-A", "/run/cosy").stdout.split()
    assert "broker.lock" in left and not [f for f in left if f.endswith(".sock")], left
