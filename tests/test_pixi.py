"""pixi.toml parses, its tasks run real commands, and its dependencies agree with pyproject.toml."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "cosy-tts"
# Commands a task may run that come from a package the same environment declares: command -> package.
PROVIDED_BY = {"git": "git", "modelscope": "modelscope", "huggingface-cli": "huggingface-hub",
               "python": "python", "pip": "pip"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(text: str) -> tuple[str, str]:
    """'torch>=2.6,<2.9' -> ('torch', '<2.9,>=2.6'): a normalised name and its specifiers, sorted."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*(\[[^\]]*\])?\s*(.*)$", text)
    assert match, text
    specs = ",".join(sorted(s.strip() for s in match.group(3).split(";")[0].split(",") if s.strip()))
    return _norm(match.group(1)), specs


@pytest.fixture(scope="module")
def pixi() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pixi.toml").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _features(pixi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The default feature (top-level tables) and the named ones."""
    top = {k: pixi.get(k, {}) for k in ("dependencies", "pypi-dependencies", "tasks")}
    return {"default": top, **pixi.get("feature", {})}


def _env_packages(pixi: dict[str, Any], env: str) -> set[str]:
    feats = _features(pixi)
    names = ["default"] + [f for f in pixi["environments"][env].get("features", [])]
    out: set[str] = set()
    for f in names:
        out |= {_norm(p) for p in feats[f].get("dependencies", {})}
        out |= {_norm(p) for p in feats[f].get("pypi-dependencies", {})}
    return out


def test_environments_default_and_gpu(pixi: dict[str, Any], pyproject: dict[str, Any]) -> None:
    assert {"default", "gpu"} <= set(pixi["environments"])
    assert "gpu" in pixi["environments"]["gpu"]["features"]
    gpu = pixi["feature"]["gpu"]
    assert gpu["system-requirements"]["cuda"].startswith("12")
    assert pixi["dependencies"]["python"] == "3.11.*"
    low = re.match(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert low and int(low.group(1)) <= 11  # the pinned Python satisfies requires-python


def test_tasks_name_real_commands(pixi: dict[str, Any], pyproject: dict[str, Any]) -> None:
    scripts = set(pyproject["project"]["scripts"])
    tasks_seen = 0
    for env in pixi["environments"]:
        feats = ["default"] + pixi["environments"][env].get("features", [])
        packages = _env_packages(pixi, env)
        all_tasks = {name: t for f in feats for name, t in _features(pixi)[f].get("tasks", {}).items()}
        for name, task in all_tasks.items():
            cmd = task if isinstance(task, str) else task["cmd"]
            for dep in ([] if isinstance(task, str) else task.get("depends-on", [])):
                assert dep in all_tasks, f"task {name} depends on unknown task {dep}"
            for part in re.split(r"&&|\|\||;", cmd):
                program = shlex.split(part)[0]
                if program.startswith("./") or "/" in program:
                    assert (ROOT / program).is_file(), f"task {name}: {program} is not in the repository"
                elif program in scripts:
                    assert _norm(PROJECT) in packages
                else:
                    assert program in PROVIDED_BY, f"task {name}: where does {program!r} come from?"
                    assert _norm(PROVIDED_BY[program]) in packages, f"task {name}: {env} lacks {PROVIDED_BY[program]}"
            tasks_seen += 1
    assert tasks_seen >= 4
    assert pixi["tasks"]["demo"] == "./dev.sh demo" and pixi["tasks"]["test"] == "./dev.sh test"
    gpu_tasks = pixi["feature"]["gpu"]["tasks"]
    assert {"fetch-cosyvoice", "fetch-models"} <= set(gpu_tasks)
    assert re.search(r"checkout [0-9a-f]{40}\b", gpu_tasks["fetch-cosyvoice"]["cmd"])  # a pinned revision


def test_project_extras_exist_in_pyproject(pixi: dict[str, Any], pyproject: dict[str, Any]) -> None:
    extras = set(pyproject["project"]["optional-dependencies"])
    for fname, feat in _features(pixi).items():
        spec = feat.get("pypi-dependencies", {}).get(PROJECT)
        if spec is None:
            continue
        assert spec["path"] == "." and spec.get("editable") is True
        assert set(spec.get("extras", [])) <= extras, f"{fname}: unknown extras"
    assert "piper" in pixi["pypi-dependencies"][PROJECT]["extras"]
    dev_sh = (Path(__file__).resolve().parents[1] / "dev.sh").read_text()
    installed = re.search(r'pip install -q -e "\.\[([a-z,]+)\]"', dev_sh)
    assert installed, "dev.sh's editable install"
    assert set(installed.group(1).split(",")) <= set(pixi["pypi-dependencies"][PROJECT]["extras"]), \
        "pixi's default environment has the extras dev.sh installs for the tests"
    assert "gpu" in pixi["feature"]["gpu"]["pypi-dependencies"][PROJECT]["extras"]


def test_gpu_feature_spells_out_the_gpu_extra(pixi: dict[str, Any], pyproject: dict[str, Any]) -> None:
    declared = {_norm(k): v for k, v in pixi["feature"]["gpu"]["pypi-dependencies"].items() if isinstance(v, str)}
    for req in pyproject["project"]["optional-dependencies"]["gpu"]:
        name, specs = _requirement(req)
        assert name in declared, f"pyproject's gpu extra has {name}; pixi's gpu feature does not"
        assert _requirement(f"{name}{declared[name]}")[1] == specs, f"{name}: pixi {declared[name]!r} vs {req!r}"
    for name in ("torch", "torchaudio", "onnxruntime-gpu", "nvidia-ml-py"):
        assert name in declared
    assert any(n.startswith("tensorrt") for n in declared)


def test_no_dependency_is_pinned_two_ways(pixi: dict[str, Any], pyproject: dict[str, Any]) -> None:
    core = dict(_requirement(r) for r in pyproject["project"]["dependencies"])
    for extra in pyproject["project"]["optional-dependencies"].values():
        core.update(_requirement(r) for r in extra if _requirement(r)[0] not in core)
    for fname, feat in _features(pixi).items():
        for name, spec in feat.get("pypi-dependencies", {}).items():
            if isinstance(spec, str) and _norm(name) in core:
                assert _requirement(f"{name}{spec}")[1] == core[_norm(name)], f"{fname}: {name} differs"
