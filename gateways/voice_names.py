"""Which voice a request's ``voice`` names: aliases, OpenAI's built-in names, served voices, the registry.

Resolution, first match wins:

1. an explicit alias (``--voice-alias NAME=VOICE``, or the config file's ``[voice_aliases]`` table) names its
   target, even when a worker serves a voice called NAME;
2. a voice a connected worker serves is itself;
3. one of OpenAI's built-in names (:data:`OPENAI_VOICES`) is the alias ``*`` when one is configured, else the
   served default voice (the default voice of the first connected worker, the one ``cosy status`` lists first);
4. a voice of the voice registry that no worker serves yet is sent as the job's own prompt (its reference audio
   and transcript) to a worker that clones;
5. anything else goes to the broker as it is, which answers UNKNOWN_VOICE with the served voices (HTTP 404).

An alias's target goes through steps 2, 4 and 5 (it is not looked up as an alias again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cosy.voices import Voice

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
WILDCARD = "*"  # an alias for every OpenAI name that has none of its own


@dataclass(frozen=True)
class Resolved:
    voice: str | None  # what the job names (None: each worker's default)
    via: str  # "default", "alias", "served", "openai", "registry" or "unknown"
    registry: Voice | None = None  # set when the job carries this registry voice as its own prompt


def resolve(name: str | None, aliases: dict[str, str], served: list[str], default: str | None,
            registry: Callable[[str], Voice | None]) -> Resolved:
    if not name:
        return Resolved(None, "default")
    via = "served"
    if name in aliases and name != WILDCARD:
        name, via = aliases[name], "alias"
    elif name not in served and name in OPENAI_VOICES:
        target = aliases.get(WILDCARD) or default
        if target is None:
            return Resolved(None, "openai")
        name, via = target, "openai"
    if name in served:
        return Resolved(name, via)
    voice = registry(name)
    if voice is not None:
        return Resolved(name, "registry", voice)
    return Resolved(name, "unknown")


def alias_table(aliases: dict[str, str], served: list[str], default: str | None) -> list[dict[str, Any]]:
    """Every alias (OpenAI's names and the configured ones) with the voice it resolves to now (None: none yet)."""
    names = [*OPENAI_VOICES, *sorted(a for a in aliases if a not in OPENAI_VOICES and a != WILDCARD)]
    out = []
    for name in names:
        if name in served and name not in aliases:
            continue  # a served voice of that name is listed as itself
        if name in aliases:
            target: str | None = aliases[name]
        else:
            target = aliases.get(WILDCARD) or default
        out.append({"id": name, "name": name, "alias_of": target})
    return out


def parse_aliases(pairs: dict[str, str]) -> dict[str, str]:
    """Checked aliases: ValueError for an empty name or target."""
    out = {}
    for name, target in pairs.items():
        name, target = str(name).strip(), str(target).strip()
        if not name or not target:
            raise ValueError(f"a voice alias needs NAME=VOICE, got {name!r}={target!r}")
        out[name] = target
    return out
