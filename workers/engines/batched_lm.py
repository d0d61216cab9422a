"""The CosyVoice LLM (a Qwen2 over speech tokens) decoding many streams at once, over the library's weights.

The library decodes one request per thread through Hugging Face's generic forward. Here one forward serves a
batch: every stream owns a *slot* of a static KV cache (``[layers, slots, kv_heads, max_len, head_dim]``),
active streams are kept in slots ``0..n-1`` (a stream that leaves is replaced by the last one, whose cache
rows move), so a decode step reads the cache as a view, never a gather. The forward is our own (RMSNorm,
rotary embedding, grouped-query attention, SwiGLU), reading the weights of the library's loaded
``Qwen2ForCausalLM`` and its rotary module's frequencies, so it follows whatever ``transformers`` loaded.

On CUDA the decode step (forward, head, sampling, window update) is captured as one CUDA graph per batch-size
bucket; elsewhere, and wherever capture fails, it runs eagerly: same code, same results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .sampling import SamplingRules, sample

log = logging.getLogger("cosy.engine.lm")


@dataclass
class StepInputs:
    """The static per-slot tensors a decode step reads and updates (device-resident; graphs capture them)."""

    x: torch.Tensor  # [slots, hidden] the next input embedding of each slot
    pos: torch.Tensor  # [slots] int64: the position that input takes (= cache length)
    steps: torch.Tensor  # [slots] int64: tokens decoded so far
    min_len: torch.Tensor  # [slots] int64
    window: torch.Tensor  # [slots, win] int64: last tokens, -1 where none
    uniforms: torch.Tensor  # [slots, max_steps, 2]
    tokens: torch.Tensor  # [slots] int64: the step's output


def lm_input(llm: Any, text: torch.Tensor, prompt_text: torch.Tensor, prompt_speech_token: torch.Tensor,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, T, hidden]: sos, prompt text + text, task id, prompt speech tokens: the library's layout
    (``Qwen2LM.inference``; CosyVoice3LM takes sos and task id from its speech embedding)."""
    with torch.inference_mode():
        tokens = torch.cat([prompt_text, text], dim=1).to(device)
        text_emb = llm.llm.model.model.embed_tokens(tokens)
        table = llm.speech_embedding if "CosyVoice3" in type(llm).__name__ else llm.llm_embedding
        sos = int(getattr(llm, "sos", getattr(llm, "sos_eos", 0)))
        parts = [table.weight[sos].reshape(1, 1, -1), text_emb, table.weight[int(llm.task_id)].reshape(1, 1, -1)]
        if prompt_speech_token.shape[1]:
            parts.append(llm.speech_embedding(prompt_speech_token.to(device)))
        return torch.cat([p.to(dtype) for p in parts], dim=1)


class BatchedQwen2LM:
    """Prefill one stream into its slot; decode all active slots by one token in one step."""

    def __init__(self, llm: Any, slots: int, max_len: int, rules: SamplingRules, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.llm = llm  # the library's Qwen2LM / CosyVoice3LM (modules converted to ``dtype`` by the caller)
        hf = llm.llm.model  # Qwen2ForCausalLM
        self.model = hf.model
        cfg = hf.config
        self.layers = list(self.model.layers)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.hidden = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.heads)
        rotary = self.model.rotary_emb
        self.inv_freq = rotary.inv_freq.to(device=device, dtype=torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.slots = slots
        self.max_len = max_len
        self.rules = rules
        self.dtype = dtype
        self.device = device
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.embed_tokens = self.model.embed_tokens
        self.speech_embedding = llm.speech_embedding
        self.decoder = llm.llm_decoder

    # --- the prompt ------------------------------------------------------------------------

    # --- the transformer ---------------------------------------------------------------------

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``pos`` ([B, T]) as [B, 1, T, head_dim]."""
        freqs = pos.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return ((emb.cos() * self.rope_scale).to(self.dtype).unsqueeze(1),
                (emb.sin() * self.rope_scale).to(self.dtype).unsqueeze(1))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv(self, layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn = layer.self_attn
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _attend_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over a prompt (prefill, one stream)."""
        groups = self.heads // self.kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode attention (one query per stream) for grouped-query heads without repeating the cache: each KV
        head's cache rows are read once for its group of query heads. q [B, heads, 1, d], k/v [B, kv, L, d],
        mask [B, L] (True: attend); returns [B, heads, 1, d]."""
        b, _, _, d = q.shape
        groups = self.heads // self.kv_heads
        qg = q.view(b, self.kv_heads, groups, d)
        scores = torch.einsum("bhgd,bhld->bhgl", qg, k).float() * (d ** -0.5)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1).to(v.dtype)
        return torch.einsum("bhgl,bhld->bhgd", weights, v).reshape(b, self.heads, 1, d)

    def _block_tail(self, layer: Any, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn_out.shape
        x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))

    @torch.inference_mode()
    def prefill(self, slot: int, lm_input: torch.Tensor) -> torch.Tensor:
        """Run the prompt ([1, T, hidden]) into ``slot``'s cache; returns the log-probabilities after it ([1, V])."""
        t = lm_input.shape[1]
        if t > self.max_len:
            raise ValueError(f"the prompt has {t} positions, more than the cache's {self.max_len}")
        pos = torch.arange(t, device=self.device).unsqueeze(0)
        cos, sin = self._rope(pos)
        x = lm_input
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            self.k[i, slot, :, :t] = k[0]
            self.v[i, slot, :, :t] = v[0]
            x = self._block_tail(layer, x, self._attend_prompt(q, k, v))
        return self._logp(self.model.norm(x)[:, -1])

    def _logp(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(hidden)
        return logits.float().log_softmax(dim=-1) if self.dtype != torch.float64 else logits.log_softmax(dim=-1)

    def decode(self, n: int, inputs: StepInputs, length: int) -> None:
        """One token for slots ``0..n-1``: reads ``inputs.x/pos``, attends over the first ``length`` cache
        positions, samples, and writes ``inputs.tokens``, the next ``x``, ``pos``, ``steps`` and ``window``."""
        with torch.inference_mode():
            x = inputs.x[:n].unsqueeze(1)  # [n, 1, hidden]
            pos = inputs.pos[:n]
            cos, sin = self._rope(pos.unsqueeze(1))
            rows = torch.arange(n, device=self.device)
            mask = torch.arange(length, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)  # [n, length]
            for i, layer in enumerate(self.layers):
                q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
                at = pos.clamp(max=self.max_len - 1)  # a free slot inside a graph's bucket keeps counting
                self.k[i, rows, :, at] = k[:, :, 0]
                self.v[i, rows, :, at] = v[:, :, 0]
                out = self._attend_one(q, self.k[i, :n, :, :length], self.v[i, :n, :, :length], mask)
                x = self._block_tail(layer, x, out)
            logp = self._logp(self.model.norm(x)[:, 0])
            steps = inputs.steps[:n]
            u = inputs.uniforms[:n].gather(1, steps.clamp(max=inputs.uniforms.shape[1] - 1).view(n, 1, 1)
                                           .expand(n, 1, 2)).squeeze(1)
            tokens = sample(logp, self.rules, inputs.window[:n], steps, inputs.min_len[:n], u)
            self._advance(n, inputs, tokens)

    def _advance(self, n: int, inputs: StepInputs, tokens: torch.Tensor) -> None:
        inputs.tokens[:n] = tokens
        inputs.x[:n] = self.speech_embedding.weight[tokens].to(self.dtype)
        inputs.pos[:n] += 1
        inputs.steps[:n] += 1
        inputs.window[:n] = torch.cat([inputs.window[:n, 1:], tokens.unsqueeze(1)], dim=1)

    @torch.inference_mode()
    def first_token(self, slot: int, logp: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Sample the token after a prefill ([1, V] log-probabilities) and make it the slot's next input."""
        s = slice(slot, slot + 1)
        token = sample(logp, self.rules, inputs.window[s], inputs.steps[s], inputs.min_len[s],
                       inputs.uniforms[slot, 0:1])
        inputs.tokens[s] = token
        inputs.x[s] = self.speech_embedding.weight[token].to(self.dtype)
        inputs.steps[s] = 1
        inputs.window[s] = torch.cat([inputs.window[s, 1:], token.unsqueeze(1)], dim=1)
        return token

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy ``src``'s cache rows (its first ``length`` positions) into ``dst`` (compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class GraphedDecode:
    """CUDA graphs of ``BatchedQwen2LM.decode`` over the whole cache length, one per batch-size bucket.

    Captured at warm-up; each graph is checked against the eager step on the same inputs before it is used,
    and a bucket whose capture fails or differs stays eager (logged)."""

    def __init__(self, lm: BatchedQwen2LM, inputs: StepInputs, buckets: list[int]) -> None:
        self.lm = lm
        self.inputs = inputs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buckets = sorted(buckets)
        self.pool = None

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return n

    def capture(self) -> list[int]:
        """Capture every bucket; returns the buckets that are graphed."""
        lm, inputs = self.lm, self.inputs
        saved = {name: getattr(inputs, name).clone() for name in ("x", "pos", "steps", "window", "tokens")}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for b in self.buckets:
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm the kernels and the allocator outside the graph
                        self._restore(saved)
                        lm.decode(b, inputs, lm.max_len)
                torch.cuda.current_stream().wait_stream(stream)
                self._restore(saved)
                lm.decode(b, inputs, lm.max_len)
                expected = inputs.tokens[:b].clone()
                graph = torch.cuda.CUDAGraph()
                self._restore(saved)
                with torch.cuda.graph(graph, pool=self.pool):
                    lm.decode(b, inputs, lm.max_len)
                self.pool = graph.pool()
                self._restore(saved)
                graph.replay()
                if not torch.equal(inputs.tokens[:b], expected):
                    log.warning("CUDA graph for batch %d differs from the eager step: kept eager", b)
                    continue
                self.graphs[b] = graph
            except Exception as exc:  # noqa: BLE001 - any capture problem: that bucket stays eager
                log.warning("CUDA graph capture failed for batch %d (%s): kept eager", b, exc)
        self._restore(saved)
        return sorted(self.graphs)

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            getattr(self.inputs, name).copy_(value)

    def step(self, n: int, length: int) -> None:
        b = self.bucket(n)
        graph = self.graphs.get(b)
        if graph is None:
            self.lm.decode(n, self.inputs, length)
        else:
            graph.replay()


class TorchBackend:
    """The LLM loop's ``torch`` backend: ``BatchedQwen2LM`` and its step state, with CUDA graphs where possible."""

    STATE = ("x", "pos", "steps", "min_len", "window", "uniforms")

    def __init__(self, llm: Any, slots: int, max_len: int, rules: SamplingRules, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.lm = BatchedQwen2LM(llm, slots, max_len, rules, dtype, device)
        self.slots = slots
        self.stop_tokens = frozenset(int(t) for t in getattr(llm, "stop_token_ids", [llm.speech_token_size]))
        self.device = device
        udtype = torch.float64 if dtype == torch.float64 else torch.float32
        long = {"dtype": torch.long, "device": device}
        self.inputs = StepInputs(x=torch.zeros(slots, self.lm.hidden, dtype=dtype, device=device),
                                 pos=torch.zeros(slots, **long), steps=torch.zeros(slots, **long),
                                 min_len=torch.zeros(slots, **long),
                                 window=torch.full((slots, max(1, rules.win_size)), -1, **long),
                                 uniforms=torch.zeros(slots, max_len, 2, dtype=udtype, device=device),
                                 tokens=torch.zeros(slots, **long))
        self.lengths = [0] * slots  # host mirror: cache positions each slot uses after its next step
        self.graphs: GraphedDecode | None = None
        # The LLM loop's own CUDA stream: on the legacy default stream its steps would serialise with the
        # vocoder's flow and HiFT instead of overlapping them.
        self.cuda_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def thread_context(self) -> Any:
        """What the LLM loop's thread runs under: its CUDA stream (nothing on a CPU)."""
        import contextlib

        return torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()

    def admit(self, stream: Any, slot: int) -> list[int]:
        from .sampling import fill_uniforms

        piece = stream.piece
        inp = piece.inputs
        empty = torch.zeros(1, 0, dtype=torch.int32)
        embeds = lm_input(self.lm.llm, inp["text"], inp["prompt_text"], inp.get("llm_prompt_speech_token", empty),
                          self.lm.dtype, self.device)
        t = embeds.shape[1]
        room = self.lm.max_len - t - 1
        if room < 1:
            from .base import EngineError

            raise EngineError(f"the prompt and text take {t} positions, more than the cache's {self.lm.max_len} "
                              "(option max_len)")
        if piece.max_tokens > room:
            log.warning("piece capped at %d tokens by the cache (max_len %d)", room, self.lm.max_len)
            piece.max_tokens = room
        i = self.inputs
        fill_uniforms(i.uniforms, slot, piece.seed)
        i.window[slot] = -1
        i.steps[slot] = 0
        i.min_len[slot] = piece.min_tokens
        i.pos[slot] = t
        token = self.lm.first_token(slot, self.lm.prefill(slot, embeds), i)
        self.lengths[slot] = t + 1
        return [int(token.item())]

    def step(self, n: int) -> list[list[int]]:
        length = max(self.lengths[:n])
        if self.graphs is not None:
            self.graphs.step(n, length)
        else:
            self.lm.decode(n, self.inputs, length)
        for s in range(n):
            self.lengths[s] += 1
        return [[t] for t in self.inputs.tokens[:n].tolist()]  # the step's one host synchronisation

    def move(self, src: int, dst: int, stream: Any) -> None:
        self.lm.move_slot(src, dst, self.lengths[src])
        for name in self.STATE:
            t = getattr(self.inputs, name)
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def release(self, slot: int, stream: Any) -> None:
        self.lengths[slot] = 0
        self.inputs.pos[slot] = 0
        self.inputs.steps[slot] = 0

    def reset(self) -> None:
        for s in range(self.slots):
            self.release(s, None)

    def capture_graphs(self, buckets: list[int]) -> list[int]:
        """CUDA graphs for these batch sizes (CUDA only); returns those captured."""
        if self.device.type != "cuda":
            return []
        self.graphs = GraphedDecode(self.lm, self.inputs, buckets)
        captured = self.graphs.capture()
        if not captured:
            self.graphs = None
        return captured
