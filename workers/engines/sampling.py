"""The CosyVoice library's sampling rules, vectorised over a batch of streams on the device.

The library samples one stream at a time in Python (``cosyvoice/utils/common.py``, ``ras_sampling``): nucleus
sampling (the sorted probabilities are taken while their sum so far is below ``top_p`` and fewer than ``top_k``
are taken), then Repetition Aware Sampling: when the chosen token occurs ``win_size * tau_r`` times or more in
the stream's last ``win_size`` tokens, it is drawn again from the whole distribution (upstream with the chosen
token excluded). Before ``min_len`` tokens the end-of-speech token is impossible (``sampling_ids``).

Here the same rules run as tensor operations over ``[batch, vocab]``, with no host synchronisation, so one
decode step samples every stream at once (and can be captured in a CUDA graph). Randomness comes from each
stream's own table of uniforms, filled from a generator seeded per job: a stream draws the same tokens whatever
else shares its batch, and the same seed gives the same speech.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingRules:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    # Upstream excludes the repeated token from the second draw; the PyPI fork cosyvoice2-eu does not.
    exclude_repeated: bool = True
    eos: int = 0  # the token that min_len forbids (the library's speech_token_size)

    @classmethod
    def from_library(cls, llm: Any) -> SamplingRules:
        """The rules of a loaded ``Qwen2LM`` / ``CosyVoice3LM``: its ``sampling`` partial's parameters, and how
        its ``ras_sampling`` redraws (asked of the function itself, see ``_excludes_repeated``)."""
        sampling = llm.sampling
        func = sampling.func if isinstance(sampling, functools.partial) else sampling
        params = {k: v.default for k, v in inspect.signature(func).parameters.items()
                  if v.default is not inspect.Parameter.empty}
        if isinstance(sampling, functools.partial):
            params.update(sampling.keywords)
        return cls(top_p=float(params.get("top_p", 0.8)), top_k=int(params.get("top_k", 25)),
                   win_size=int(params.get("win_size", 10)), tau_r=float(params.get("tau_r", 0.1)),
                   exclude_repeated=_excludes_repeated(func, params), eos=int(llm.speech_token_size))

    @property
    def repeat_threshold(self) -> float:
        return self.win_size * self.tau_r


def _excludes_repeated(func: Any, params: dict[str, Any]) -> bool:
    """Ask the library's function: a distribution all but certain of token 0, a window full of 0s, top-k 1.
    If the redraw excludes the repeated token, the answer is never 0; if it does not, it is 0."""
    if "win_size" not in params:
        return True
    scores = torch.full((8,), -40.0)
    scores[0] = 0.0
    win = int(params.get("win_size", 10))
    try:
        top = func(scores.log_softmax(0), [0] * win, 25, top_p=params.get("top_p", 0.8), top_k=1, win_size=win,
                   tau_r=params.get("tau_r", 0.1))
    except Exception:  # noqa: BLE001 - an unknown signature: assume upstream's rule
        return True
    return int(top) != 0


def fill_uniforms(table: torch.Tensor, row: int, seed: int) -> None:
    """Fill ``table[row]`` ([steps, 2] uniforms in [0, 1)) from a generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    values = torch.rand(table.shape[1:], generator=gen, dtype=torch.float64)
    table[row].copy_(values.to(table.dtype), non_blocking=True)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` ([B, K], not normalised, rows with some mass) by inverse CDF at ``u`` ([B])."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    idx = (cdf <= target).sum(dim=-1)  # the first index whose cdf exceeds the target
    return idx.clamp_(max=probs.shape[1] - 1)


def sample(logp: torch.Tensor, rules: SamplingRules, window: torch.Tensor, steps: torch.Tensor,
           min_len: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Next tokens for a batch.

    logp      [B, V] log-probabilities (the LLM head's log_softmax)
    window    [B, win_size] the stream's last tokens (-1 where there are none yet)
    steps     [B] tokens decoded so far; min_len [B]: before it the eos token is impossible
    uniforms  [B, 2] this step's uniforms (nucleus draw, redraw)
    Returns [B] int64 token ids, on the device; nothing here waits for the GPU.
    """
    scores = logp.float() if logp.dtype in (torch.float16, torch.bfloat16) else logp.clone()
    forbid_eos = steps < min_len
    scores[:, rules.eos] = torch.where(forbid_eos, torch.full_like(scores[:, rules.eos], -float("inf")),
                                       scores[:, rules.eos])
    probs = scores.softmax(dim=-1)
    k = min(rules.top_k, probs.shape[1])
    top_probs, top_idx = probs.sort(dim=-1, descending=True, stable=True)
    top_probs, top_idx = top_probs[:, :k], top_idx[:, :k]
    before = top_probs.cumsum(dim=-1) - top_probs  # the library's cum_prob when it considers each entry
    kept = torch.where(before < rules.top_p, top_probs, torch.zeros_like(top_probs))
    kept[:, 0] = top_probs[:, 0]  # the first is always taken
    choice = top_idx.gather(1, _draw(kept, uniforms[:, 0]).unsqueeze(1)).squeeze(1)

    repeats = (window == choice.unsqueeze(1)).sum(dim=-1)
    redraw = repeats.to(probs.dtype) >= rules.repeat_threshold
    full = probs
    if rules.exclude_repeated:
        full = probs.scatter(1, choice.unsqueeze(1), 0.0)
    second = _draw(full, uniforms[:, 1])
    return torch.where(redraw, second, choice)
