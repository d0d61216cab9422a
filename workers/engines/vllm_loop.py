"""The LLM loop's ``vllm`` backend: the library's vLLM export (``load_vllm``), stepped for every stream by the one
LLM-loop thread.

The library runs vLLM from each request's own thread: every thread adds its request, then takes a shared lock
to call ``LLMEngine.step()`` and polls its queue with ``time.sleep(0.001)`` (``Qwen2LM.inference_wrapper``).
Here the pipeline's LLM loop is vLLM's only caller: it adds a stream's request at admission, calls ``step()``
once per turn for all of them (vLLM batches them itself), hands each stream its new tokens and aborts the
requests of cancelled streams. No lock, no sleep, no thread per request.

Sampling is vLLM's, with the library's vLLM parameters (top-k, the stop tokens, min/max tokens) and the
stream's seed: not the Repetition Aware Sampling of the torch backend (as in the library's vLLM path).

This has never run against a real vLLM here (no machine this project tests on can install it); its tests drive
it through a stand-in with ``add_request`` / ``step`` / ``abort_request`` of vLLM's shape (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .batched_lm import lm_input
from .sampling import SamplingRules


def vllm_sampling_params(rules: SamplingRules, stop_tokens: frozenset[int], min_tokens: int, max_tokens: int,
                         seed: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(top_k=rules.top_k, stop_token_ids=sorted(stop_tokens), min_tokens=min_tokens,
                          max_tokens=max_tokens, seed=seed)


class VllmBackend:
    def __init__(self, engine: Any, llm: Any, slots: int, rules: SamplingRules,
                 params: Callable[..., Any] = vllm_sampling_params) -> None:
        import torch

        self.engine = engine  # vllm.LLMEngine, or anything with add_request / step / abort_request
        self.llm = llm
        self.slots = slots
        self.rules = rules
        self.params = params
        self.stop_tokens = frozenset(int(t) for t in llm.stop_token_ids)
        self.requests: list[str | None] = [None] * slots  # slot -> request id
        self.seen: dict[str, int] = {}  # request id -> tokens handed over so far
        self.torch = torch
        self.device = next(llm.parameters()).device

    def admit(self, stream: Any, slot: int) -> list[int]:
        piece = stream.piece
        inputs = piece.inputs
        empty = self.torch.zeros(1, 0, dtype=self.torch.int32)
        embeds = lm_input(self.llm, inputs["text"], inputs["prompt_text"],
                          inputs.get("llm_prompt_speech_token", empty), self.torch.bfloat16, self.device)
        rid = piece.uuid
        self.engine.add_request(rid, {"prompt_embeds": embeds.squeeze(0)},
                                self.params(self.rules, self.stop_tokens, piece.min_tokens, piece.max_tokens,
                                            piece.seed))
        self.requests[slot] = rid
        self.seen[rid] = 0
        return []  # vLLM prefills inside its next step

    def step(self, n: int) -> list[list[int]]:
        new: dict[str, list[int]] = {}
        for out in self.engine.step():
            rid = out.request_id
            if rid not in self.seen:
                continue  # aborted meanwhile
            ids = list(out.outputs[0].token_ids)
            fresh = [int(t) for t in ids[self.seen[rid]:]]
            self.seen[rid] = len(ids)
            if out.finished and not (fresh and fresh[-1] in self.stop_tokens):
                fresh.append(min(self.stop_tokens))  # vLLM ended it (max tokens): end the piece here too
            if out.finished:
                self.seen.pop(rid, None)
            new[rid] = fresh
        return [new.get(self.requests[s] or "", []) for s in range(n)]

    def move(self, src: int, dst: int, stream: Any) -> None:
        self.requests[dst], self.requests[src] = self.requests[src], None

    def release(self, slot: int, stream: Any) -> None:
        rid = stream.piece.uuid
        if self.requests[slot] == rid:
            self.requests[slot] = None
        if self.seen.pop(rid, None) is not None:
            self.engine.abort_request(rid)  # still running in vLLM (cancelled): free its KV blocks now

    def reset(self) -> None:
        for rid in list(self.seen):
            self.engine.abort_request(rid)
        self.seen.clear()
        self.requests = [None] * self.slots
