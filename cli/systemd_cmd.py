"""`cosy systemd install`: render the unit files for this installation and say how to enable them.

The templates live in the repository's ``systemd/`` folder (or the ``cosy.systemd`` package data
of a wheel). Rendering is line-based and keeps the files readable:

- ``@COSY@`` becomes the absolute path of this installation's ``cosy`` command;
- ``--user`` units lose ``User=``/``Group=`` and the sandboxing options that need privileges
  (mount namespaces, device cgroups, capability bounding), and hang off ``default.target``;
- ``ProtectHome=yes`` becomes ``read-only`` when cosy (or the model) is installed under /home,
  /root or /run/user, so that the service can still read it.

One worker instance per GPU (``cosy-worker@0.service`` …); with no GPU, one CPU instance
``cosy-worker@cpu.service`` running the piper engine.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

BROKER_UNIT = "cosy-broker.service"
WORKER_TEMPLATE = "cosy-worker@.service"
TARGET_UNIT = "cosy.target"
CPU_INSTANCE = "cpu"
PLACEHOLDER = "@COSY@"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CONFIG_DIR = Path("/etc/cosy")
HOME_PREFIXES = ("/home", "/root", "/run/user")

# Options a user manager cannot apply (they need root, a mount namespace or the device cgroup).
USER_DROPPED_KEYS = frozenset({
    "User", "Group", "SupplementaryGroups", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
    "ProtectHostname", "ProtectProc", "ProcSubset", "CapabilityBoundingSet", "DevicePolicy", "DeviceAllow",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
})


# --- rendering --------------------------------------------------------------------------


def templates_dir() -> Path:
    """The folder of unit templates: package data of a wheel, else the source tree's systemd/."""
    try:
        from importlib.resources import files

        packaged = Path(str(files("cosy.systemd")))
        if (packaged / BROKER_UNIT).is_file():
            return packaged
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / "systemd"


def cosy_command() -> str:
    """Absolute command line that runs this installation's cosy (without relying on $PATH, sudo resets it)."""
    beside = Path(sys.executable).with_name("cosy")  # the venv's script; sys.executable is kept unresolved
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    import shutil

    found = shutil.which("cosy")
    if found:
        return str(Path(found).absolute())
    return f"{Path(sys.executable).absolute()} -m cosy"


def _key(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped[0] in "#;[" or "=" not in stripped:
        return None
    return stripped.split("=", 1)[0].strip()


def render_unit(text: str, cosy: str, user: bool = False, protect_home: str = "yes") -> str:
    out: list[str] = []
    for line in text.splitlines():
        key = _key(line)
        if user and key in USER_DROPPED_KEYS:
            continue
        if key == "ProtectHome":
            line = f"ProtectHome={protect_home}"
        if user and key == "WantedBy":
            line = line.replace("multi-user.target", "default.target")
        if user and key == "RuntimeDirectoryMode":
            line = "RuntimeDirectoryMode=0700"  # your own sockets: no group to share them with
        if user and key == "ExecStart":
            line = line.replace(" --group", "")
        if key is not None:  # comments keep the placeholder's name
            line = line.replace(PLACEHOLDER, cosy)
        out.append(line)
    return "\n".join(out) + "\n"


def instance_view(text: str, instance: str) -> list[str]:
    """The lines of a rendered template that change per instance, with %i filled in (for display)."""
    return [line.replace("%i", instance) for line in text.splitlines()
            if "%i" in line and _key(line) in ("ExecStart", "Environment", "EnvironmentFile", "Description")]


def _under_home(path: str | Path) -> bool:
    p = str(Path(path).absolute())
    return any(p == h or p.startswith(h + "/") for h in HOME_PREFIXES)


def protect_home_value(paths: list[str | Path]) -> str:
    return "read-only" if any(_under_home(p) for p in paths) else "yes"


def _unreadable_for_others(path: Path) -> Path | None:
    """The first folder above PATH that other users cannot enter (the `cosy` user would fail there)."""
    for parent in reversed(Path(path).absolute().parents):
        try:
            if not parent.stat().st_mode & 0o001:
                return parent
        except OSError:
            return parent
    return None


def extra_units(src: Path) -> list[Path]:
    core = {BROKER_UNIT, WORKER_TEMPLATE, TARGET_UNIT}
    return sorted(p for ext in ("service", "socket", "timer") for p in src.glob(f"*.{ext}") if p.name not in core)


# --- GPUs and instances ---------------------------------------------------------------------


def detect_gpus() -> tuple[int, str | None]:
    """How many GPUs NVML sees, and a note when detection is unavailable."""
    try:
        from cosy.gpu import count_gpus  # written separately; NVML behind it
    except ImportError:
        return 0, "GPU detection unavailable (cosy.gpu is not installed): assuming no GPU"
    try:
        return int(count_gpus()), None
    except Exception as exc:  # NVML missing or broken: treat as no GPU, but say why
        return 0, f"GPU detection failed ({exc}): assuming no GPU"


def parse_gpus(spec: str) -> tuple[list[str], str | None]:
    """`auto`, `cpu` or a comma list of GPU indices -> instance names (and a note for the user)."""
    spec = spec.strip().lower()
    if spec == "auto":
        count, note = detect_gpus()
        if count == 0 and note is None:
            note = "NVML sees no GPU: one CPU worker (cosy-worker@cpu, piper)"
        return ([str(i) for i in range(count)] or [CPU_INSTANCE]), note
    if spec in ("cpu", "none", ""):
        return [CPU_INSTANCE], None
    instances: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--gpus takes auto, cpu or GPU indices like 0,1; got {item!r}")
        if str(int(item)) not in instances:
            instances.append(str(int(item)))
    return instances, None


# --- the plan -----------------------------------------------------------------------------


@dataclass
class InstallPlan:
    user: bool
    unit_dir: Path
    config_dir: Path
    cosy: str
    instances: list[str]
    files: dict[Path, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[str]:
        return [TARGET_UNIT, BROKER_UNIT, *(f"cosy-worker@{i}.service" for i in self.instances)]

    def commands(self) -> list[str]:
        ctl = "systemctl --user" if self.user else "systemctl"
        cmds: list[str] = []
        if not self.user:
            cmds += [
                "getent group cosy >/dev/null || groupadd --system cosy",
                "id -u cosy >/dev/null 2>&1 || useradd --system --gid cosy --home-dir /var/lib/cosy "
                "--shell /usr/sbin/nologin cosy",
                f"usermod -a -G cosy {shlex.quote(_login_name())}   # CLI access (log in again)",
            ]
        cmds += [f"{ctl} daemon-reload", f"{ctl} enable --now {' '.join(self.units)}"]
        return cmds


def _login_name() -> str:
    name = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
    return name if name and name != "root" else "YOUR_USER"


def worker_env(engine: str, model_dir: Path | None) -> str:
    lines = ["# cosy workers (all instances); worker-N.env overrides per instance.", f"COSY_ENGINE={engine}"]
    if model_dir is not None:
        key = "model_dir" if engine == "cosyvoice" else "model"  # piper's model is an .onnx file
        lines.append(f"COSY_WORKER_ARGS=--option {key}={model_dir}")
    return "\n".join(lines) + "\n"


def plan_install(user: bool, gpus: str, engine: str | None, model_dir: Path | None, unit_dir: Path | None,
                 config_dir: Path | None) -> InstallPlan:
    instances, note = parse_gpus(gpus)
    cosy = cosy_command()
    home = Path.home()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    plan = InstallPlan(
        user=user,
        unit_dir=unit_dir or (config_home / "systemd" / "user" if user else SYSTEM_UNIT_DIR),
        config_dir=config_dir or (config_home / "cosy" if user else SYSTEM_CONFIG_DIR),
        cosy=cosy, instances=instances)
    if note:
        plan.notes.append(note)
    exe = Path(shlex.split(cosy)[0])
    import cosy as cosy_pkg

    package_dir = Path(cosy_pkg.__file__).resolve().parent
    read_paths: list[str | Path] = [exe, sys.prefix, package_dir, *([model_dir] if model_dir else [])]
    protect = protect_home_value(read_paths)
    src = templates_dir()
    for name in (BROKER_UNIT, WORKER_TEMPLATE, TARGET_UNIT):
        plan.files[plan.unit_dir / name] = render_unit((src / name).read_text(), cosy, user, protect)
    for extra in extra_units(src):  # other cosy services (gateways, ...): installed, not enabled
        plan.files[plan.unit_dir / extra.name] = render_unit(extra.read_text(), cosy, user, protect)
        plan.notes.append(f"also installed, not enabled: {extra.name}")
    env_path = plan.config_dir / "worker.env"
    if engine or model_dir or not env_path.exists():
        default_engine = "piper" if instances == [CPU_INSTANCE] else "cosyvoice"
        plan.files[env_path] = worker_env(engine or default_engine, model_dir)
    else:
        plan.notes.append(f"keeping {env_path} (pass --engine/--model-dir to rewrite it)")
    if not user:
        for path in read_paths:
            blocked = _unreadable_for_others(Path(path))
            if blocked is not None:
                plan.notes.append(f"the cosy user cannot enter {blocked} (needed for {path}): install cosy "
                                  f"somewhere others can read, e.g. /opt/cosy, or use --user")
                break
    if model_dir is not None and not Path(model_dir).exists():
        plan.notes.append(f"model folder {model_dir} does not exist yet")
    return plan


# --- output ---------------------------------------------------------------------------------


def print_plan(plan: InstallPlan, dry_run: bool) -> None:
    out = sys.stdout
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if dry_run:
        out.write("# cosy systemd install --dry-run: nothing was written.\n")
        for path, text in plan.files.items():
            out.write(f"\n# ==> {path} <==\n{text}")
    template = plan.files[plan.unit_dir / WORKER_TEMPLATE]
    out.write("\n# worker instances (%i filled in):\n")
    for inst in plan.instances:
        out.write(f"# --- cosy-worker@{inst}.service\n")
        for line in instance_view(template, inst):
            out.write(f"#   {line}\n")
    prefix = "" if plan.user or os.geteuid() == 0 else "sudo "
    out.write("\n# then run:\n")
    for cmd in plan.commands():
        out.write(f"{prefix}{cmd}\n")


def write_plan(plan: InstallPlan) -> None:
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path}")


def install(user: bool, gpus: str, dry_run: bool, engine: str | None, model_dir: Path | None,
            unit_dir: Path | None, config_dir: Path | None) -> int:
    from cosy.cli import exits

    try:
        plan = plan_install(user, gpus, engine, model_dir, unit_dir, config_dir)
    except ValueError as exc:
        exits.fail(str(exc), exits.USAGE)
    if not dry_run:
        try:
            write_plan(plan)
        except PermissionError as exc:
            exits.fail(f"cannot write {exc.filename}: run with sudo, or use --user for your own units",
                       exits.USAGE)
    print_plan(plan, dry_run)
    return exits.OK


def register(app: typer.Typer) -> None:
    systemd_app = typer.Typer(help="Run cosy as systemd services.", no_args_is_help=True)

    @systemd_app.command("install")
    def install_cmd(
        user: bool = typer.Option(False, "--user", help="Units for your own user manager (systemctl --user)."),
        gpus: str = typer.Option("auto", "--gpus", help="auto (ask NVML), cpu, or GPU indices like 0,1: "
                                 "one worker instance each."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the files instead of writing them."),
        engine: str | None = typer.Option(None, "--engine", "-e", help="Worker engine [default: cosyvoice "
                                          "with GPUs, piper without]."),
        model_dir: Path | None = typer.Option(None, "--model-dir", help="Model folder passed to the engine "
                                              "(--option model_dir=DIR for cosyvoice, model= for piper)."),
        unit_dir: Path | None = typer.Option(None, "--unit-dir", help="Where to write the units [default: "
                                             "/etc/systemd/system, or ~/.config/systemd/user with --user]."),
        config_dir: Path | None = typer.Option(None, "--config-dir", help="Where worker.env goes [default: "
                                               "/etc/cosy, or ~/.config/cosy with --user]."),
    ) -> None:
        """Render the broker, worker and target units with this installation's paths; print what to run."""
        model = model_dir.absolute() if model_dir else None
        raise typer.Exit(install(user, gpus, dry_run, engine, model, unit_dir and unit_dir.absolute(),
                                 config_dir and config_dir.absolute()))

    app.add_typer(systemd_app, name="systemd")
