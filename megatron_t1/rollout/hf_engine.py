"""The CPU rollout engine: a transformers causal LM, our own decoding loop, exact sampling log-probs.

Why not ``model.generate``: it applies its warpers after any user logits processor (a processor
cannot see the distribution that is sampled), and it keeps decoding every row of the batch until
the longest one ends, appending to the whole KV cache each step. RL batches have a long tail
(the demo: mean response ~150 tokens, longest ~300-384), so most of the late steps would be spent
on rows that have finished. The loop here:

- prefills each prompt once (left-padded batch, ``logits_to_keep=1``) and repeats its cache ``n``
  times (sample ``j`` of prompt ``i`` is row ``i * n + j``, as ``num_return_sequences`` would do);
- samples from ``softmax(filter(z / tau))`` with :func:`filtered_scores` (temperature, then top-k,
  top-p, min-p: the order of transformers / vLLM) and records ``log_softmax`` of the same scores,
  so the log-probs are those of the distribution each token was drawn from;
- draws token t of sample j of a prompt by inverting the CDF at a uniform ``u[j, t]`` taken from
  that prompt's own generator (its seed, :func:`~megatron_t1.rollout.engine.prompt_seeds`), so a
  prompt's samples do not depend on the other prompts of the batch, on the batch size or on how
  many engines share a step's prompts (only float rounding of the batched forward can move a CDF
  boundary across ``u``: rare, measured in bench/RESULTS.md);
- ends a row at EOS or at the first occurrence of a stop string in its generated text (the token
  that completes it is kept), and drops finished rows from the batch and the cache once they make
  up an eighth of it, so the cost of a step follows the rows still running.

Greedy (temperature 0) takes the argmax of the filtered, untempered logits.

With ``record_routing`` (an MoE model; ``rollout.record_routing``) forward hooks on the routers
(:class:`RouteRecorder`) keep the top-k experts of every token the loop feeds to the model: the
prompt's at prefill, each response token's at the decode step that consumes it.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Sequence

import torch

from megatron_t1.rollout.engine import (
    Completion,
    EngineError,
    Prompt,
    PromptCompletions,
    SamplingParams,
    check_prompts,
    finish_reason,
    prompt_seeds,
)


def filtered_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``filter(z / tau)``: the scores whose softmax is the sampling distribution.

    logits: [B, V] float32. Temperature 0 (greedy) leaves the logits untempered. Masked tokens get
    ``-inf``. top-k keeps the k largest, top-p the smallest set of most likely tokens whose mass
    reaches p (the most likely token always stays), min-p drops tokens with ``p < min_p * p_max``.
    """
    scores = logits / params.temperature if params.temperature > 0 else logits.clone()
    neg_inf = float("-inf")
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches p (keeps the first token always).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        scores = scores.masked_fill(drop, neg_inf)
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), neg_inf)
    return scores


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] token ids drawn from ``probs`` [B, V] (rows need not be normalised) at the uniforms
    ``u`` [B] in [0, 1): the first token whose cumulative mass exceeds ``u`` times the row's total.
    A token of zero probability is never drawn (its CDF step is empty)."""
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return tok.clamp_(max=probs.shape[-1] - 1)


# A per-expert checkpoint name (HF's safetensors, our export, vLLM's loader) of an MoE layer.
_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def expert_target(name: str, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The slice of a fused expert parameter that checkpoint tensor ``name`` fills, else None.

    transformers >= 5 keeps each MoE layer's experts as two fused parameters, ``experts.gate_up_proj``
    ``[E, 2F, H]`` (gate rows, then up rows) and ``experts.down_proj`` ``[E, H, F]``, and converts
    the per-expert tensors of the checkpoint (``experts.E.{gate,up,down}_proj.weight``) on load; a
    weight update arrives under those checkpoint names.
    """
    m = _EXPERT_NAME.match(name)
    if m is None:
        return None
    prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
    fused = targets.get(f"{prefix}.{'down_proj' if which == 'down' else 'gate_up_proj'}")
    if fused is None or e >= fused.shape[0]:
        return None
    if which == "down":
        return fused[e]
    half = fused.shape[1] // 2
    return fused[e, :half] if which == "gate" else fused[e, half:]


class RouteRecorder:
    """The experts a transformers MoE model routes each token to, layer by layer, forward by forward.

    A forward hook on each MoE layer's router (``mlp.gate`` of a layer that has ``mlp.experts``:
    Qwen3-MoE, Qwen2-MoE, Mixtral) keeps its top-k indices (transformers 5's routers return them
    last; a router that returns logits, as older releases do, gets its top-k of the logits, which is
    the top-k of their softmax). :meth:`take` hands out the last forward's choices as one int16
    ``[tokens, layers, k]`` table (tokens in the forward's ``[batch, seq]`` order; -1 in dense layers).
    """

    def __init__(self, model) -> None:
        layers = model.get_decoder().layers
        self.num_layers = len(layers)
        self.routers = [
            (i, layer.mlp.gate)
            for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
        ]
        if not self.routers:
            raise ValueError(
                f"rollout.record_routing: {type(model).__name__} has no MoE router to record (a dense model)"
            )
        self.top_k = int(model.config.num_experts_per_tok)
        self._last: dict[int, torch.Tensor] = {}
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in self.routers]

    def _hook(self, layer: int):
        def hook(_module, _inputs, output) -> None:
            idx = output[-1] if isinstance(output, tuple) else output
            if idx.dtype.is_floating_point:
                idx = torch.topk(idx, self.top_k, dim=-1).indices
            self._last[layer] = idx.detach().reshape(-1, idx.shape[-1])

        return hook

    def clear(self) -> None:
        self._last.clear()

    def take(self, n_tokens: int) -> torch.Tensor:
        """The last forward's routing, ``[n_tokens, layers, k]`` int16 on the CPU; then forgets it."""
        out = torch.full((n_tokens, self.num_layers, self.top_k), -1, dtype=torch.int16)
        for layer, idx in self._last.items():
            if idx.shape != (n_tokens, self.top_k):
                raise EngineError(
                    f"layer {layer} routed {tuple(idx.shape)} (tokens, k); "
                    f"expected ({n_tokens}, {self.top_k})"
                )
            out[:, layer] = idx.to("cpu", torch.int16)
        self._last.clear()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [P, W] and attention mask [P, W] (int64) of prompts left-padded to the longest W, so
    that every prompt ends at column W - 1."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


class HFEngine:
    """A transformers causal LM as a :class:`~megatron_t1.rollout.engine.RolloutEngine` (CPU default).

    Args:
        model: a ``PreTrainedModel`` with an LM head (e.g. ``Qwen2ForCausalLM``).
        tokenizer: its tokenizer (EOS and pad ids, decoding, text prompts).
        max_batch_sequences: at most this many sequences (prompts x n) per ``generate`` call.
        record_routing: keep each token's experts (an MoE model; :class:`RouteRecorder`) in the
            results' ``routed_experts``.
    """

    def __init__(
        self, model, tokenizer, *, max_batch_sequences: int = 256, record_routing: bool = False
    ) -> None:
        self.model = model.eval()
        self.routes = RouteRecorder(model) if record_routing else None
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        # Keyword names of the KV cache and of "logits of the last position only" moved across
        # transformers releases (past_key_values -> cache in 5.x; num_logits_to_keep -> logits_to_keep).
        names = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in names else "past_key_values"
        keep = [k for k in ("logits_to_keep", "num_logits_to_keep") if k in names]
        self._last_only = {keep[0]: 1} if keep else {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        **kwargs,
    ) -> HFEngine:
        """Load an HF folder (model + tokenizer, or the tokenizer from ``tokenizer_dir``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        return cls(model, tokenizer, **kwargs)

    # ----------------------------------------------------------------------------------------------

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return [int(t) for t in prompt]

    def _finished(
        self, tokens: torch.Tensor, rows: torch.Tensor, tok: torch.Tensor, step: int, stop
    ) -> torch.Tensor:
        """[b] bool: the rows whose token ``tok`` of generation step ``step`` ends them (EOS, stop)."""
        hit = torch.isin(tok, self._eos)
        if stop:  # decode only the tails of running rows (a Python loop; stop strings are rare)
            window = 4 * max(len(x) for x in stop) + 4  # a character is <= 4 byte-level tokens
            lo = max(0, step + 1 - window)
            for b in (~hit).nonzero().flatten().tolist():
                tail = self.tokenizer.decode(tokens[rows[b], lo : step + 1].tolist())
                hit[b] = any(x in tail for x in stop)
        return hit

    @torch.no_grad()
    def _generate_batch(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: list[int]
    ) -> list[PromptCompletions]:
        from transformers import DynamicCache

        ids, mask = left_pad(prompt_ids, self.pad_id)
        dev, max_new = self.device, params.max_tokens
        uniforms = None
        if params.temperature > 0:  # [P * n, max_new]: row i * n + j is sample j of prompt i
            uniforms = torch.cat(
                [torch.rand(n, max_new, generator=torch.Generator().manual_seed(s)) for s in seeds]
            ).to(dev)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: cache},
            **self._last_only,
        )
        rec, width = self.routes, ids.shape[1]
        prompt_routes = rec.take(ids.numel()).view(len(prompt_ids), width, -1, rec.top_k) if rec else None
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        cache.batch_repeat_interleave(n)
        attn = mask.repeat_interleave(n, 0)
        next_pos = pos[:, -1].repeat_interleave(n, 0) + 1
        B = len(prompt_ids) * n
        tokens = torch.full((B, max_new), self.pad_id, dtype=torch.long)  # host copies of the outputs
        logps = torch.zeros((B, max_new), dtype=torch.float32)
        routes = None  # [B, max_new, layers, k]: the experts of response token t, when it was fed
        if rec is not None:
            routes = torch.full((B, max_new, rec.num_layers, rec.top_k), -1, dtype=torch.int16)
        finished_at = torch.full((B,), -1, dtype=torch.long)  # tokens generated when the row ended
        rows = torch.arange(B)  # original row of each batch row
        # Batch rows still generating; finished rows linger until the next compaction, ignored.
        alive = torch.ones(B, dtype=torch.bool)
        steps = 0
        for step in range(max_new):
            scores = filtered_scores(logits.float(), params)
            logp = torch.log_softmax(scores, dim=-1)
            if uniforms is not None:
                tok = inverse_cdf(logp.exp(), uniforms[rows.to(dev), step])
            else:
                tok = scores.argmax(-1)
            tok_logp = logp.gather(1, tok[:, None]).squeeze(1)
            tok_h, tok_logp, live = tok.cpu(), tok_logp.cpu(), alive.nonzero().flatten()
            tokens[rows[live], step] = tok_h[live]
            logps[rows[live], step] = tok_logp[live]
            steps = step + 1
            hit = torch.zeros_like(alive)
            hit[live] = self._finished(tokens, rows[live], tok_h[live], step, params.stop)
            finished_at[rows[hit]] = step + 1
            alive &= ~hit
            if step + 1 == max_new or not alive.any():
                break
            if (~alive).sum() * 8 >= alive.numel():  # drop the finished rows from batch and cache
                keep = alive.nonzero().flatten()
                rows, tok_h, alive = rows[keep], tok_h[keep], alive[keep]
                keep = keep.to(dev)
                cache.batch_select_indices(keep)
                attn, next_pos = attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = self.model(
                input_ids=tok_h[:, None].to(dev),
                attention_mask=attn,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{self._cache_kw: cache},
            )
            if routes is not None:  # this forward consumed token `step` of every batch row
                routes[rows, step] = rec.take(len(rows))
            next_pos = next_pos + 1
            logits = out.logits[:, -1]
        if steps == 0:
            raise EngineError("generate produced no tokens")
        finished = finished_at.tolist()
        results = []
        for i, p in enumerate(prompt_ids):
            comps = []
            for j in range(n):
                b = i * n + j
                stop_at = finished[b] if finished[b] >= 0 else None
                length = stop_at if stop_at is not None else steps
                toks = tokens[b, :length].tolist()
                routed = None
                if routes is not None:  # the last token is never fed (a lingering row's would be)
                    routed = routes[b, :length].clone()
                    routed[-1] = -1
                comps.append(
                    Completion(
                        token_ids=toks,
                        text=self.tokenizer.decode(toks, skip_special_tokens=True),
                        logprobs=logps[b, :length].tolist(),
                        finish_reason=finish_reason(length, params.max_tokens, stop_at is not None),
                        routed_experts=routed,
                    )
                )
            p_routed = prompt_routes[i, width - len(p) :].clone() if prompt_routes is not None else None
            results.append(PromptCompletions(list(p), comps, routed_experts=p_routed))
        return results

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        """``n`` samples per prompt; log-probs of the sampling distribution (module docstring).
        ``seeds``: one per prompt (default: derived from ``params.seed``); the global RNG is left
        alone unless neither is given."""
        check_prompts(prompts, n)
        prompt_ids = [self._token_ids(p) for p in prompts]
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for i, p in enumerate(prompt_ids):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        seeds = prompt_seeds(params, len(prompt_ids), seeds)
        if self.routes is not None:
            self.routes.clear()
        per_call = max(1, self.max_batch_sequences // n)
        results: list[PromptCompletions] = []
        for start in range(0, len(prompt_ids), per_call):
            end = start + per_call
            results.extend(self._generate_batch(prompt_ids[start:end], n, params, seeds[start:end]))
        return results

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Untempered ``log p(x_t | x_<t)`` [L - 1] per sequence (one right-padded forward)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):  # right padding: causal attention never sees it
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logp = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))
        return [logp[i, : len(s) - 1, 0].cpu() for i, s in enumerate(sequences)]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model in place (cast to its dtype). ``lm_head.weight`` of
        a tied model is the embedding itself, so sending it too is harmless. Per-expert tensors of an
        MoE model go into their slice of the fused expert parameters (:func:`expert_target`).
        Unknown names and shape mismatches raise ``ValueError`` naming the tensor."""
        targets = {n: t.data for n, t in self.model.state_dict(keep_vars=True).items()}
        loaded = 0
        for name, tensor in named_tensors:
            dst = targets.get(name)
            if dst is None:
                dst = expert_target(name, targets)
            if dst is None:
                raise ValueError(f"update_weights: {name} is not a tensor of the rollout model")
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(tensor.shape)}, the model {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            loaded += 1
        return loaded

    def sleep(self) -> None:
        """Nothing to release: the model stays where it is (CPU, or a GPU it shares with the trainer)."""

    def close(self) -> None:
        if self.routes is not None:
            self.routes.close()
        self.model = None
