"""The CPU rollout engine: transformers ``generate`` with the sampling log-probs recorded exactly.

transformers applies its temperature / top-k / top-p warpers *after* any user logits processor, so
a user processor cannot see the distribution that is sampled. Here the warpers are switched off
(``temperature=1, top_k=0, top_p=1, min_p=None`` in the generation config) and
:class:`_TemperedSampler` is the last processor: it turns the raw logits ``z`` [B, V] into
``filter(z / tau)`` itself (the order of transformers / HF: temperature, top-k, top-p, min-p) and
keeps ``log_softmax`` of them. ``generate`` then samples from ``softmax`` of exactly these scores,
and :class:`_Recorder`, a stopping criterion that runs right after each new token is appended,
gathers that token's log-prob and decides EOS / stop-string termination per sequence. So the
reported log-probs are those of the distribution the tokens were drawn from, with no ``[T, B, V]``
score history kept (memory: one ``[B, V]`` float32 tensor).

Prompts of different lengths are left-padded into one batch; ``n`` samples per prompt come from
``num_return_sequences`` (transformers repeats each prompt ``n`` times, adjacently).
"""

from __future__ import annotations

import contextlib
import os
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


class _TemperedSampler:
    """Last logits processor: returns ``filter(z / tau)`` and keeps its log-softmax for the recorder."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.logp: torch.Tensor | None = None  # [B, V] of the step being sampled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = filtered_scores(scores.float(), self.params)
        self.logp = torch.log_softmax(scores, dim=-1)
        return scores


class _Recorder:
    """Stopping criterion run after every step: records each new token's log-prob and ends a
    sequence at EOS or at the first occurrence of a stop string in its generated text.

    ``finished_at[b]``: number of generated tokens of sequence b when it finished (EOS or the
    stop string's last token included), -1 while running.
    """

    def __init__(self, sampler: _TemperedSampler, prompt_len: int, eos_ids: set[int], stop, tokenizer):
        self.sampler = sampler
        self.prompt_len = prompt_len
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.stop = tuple(stop)
        self.tokenizer = tokenizer
        # A character is at most 4 byte-level tokens: this tail always holds a just-finished stop string.
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self.logprobs: list[torch.Tensor] = []  # per step [B]
        self.finished_at: torch.Tensor | None = None  # [B] int64

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.finished_at is None:
            self.finished_at = torch.full((input_ids.shape[0],), -1, dtype=torch.long)
        last = input_ids[:, -1]
        assert self.sampler.logp is not None
        self.logprobs.append(self.sampler.logp.gather(1, last[:, None]).squeeze(1))
        step = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        running = self.finished_at < 0
        hit = torch.isin(last.cpu(), self.eos) & running
        if self.stop:  # decode only the running sequences' tails (a Python loop; stop strings are rare)
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            for b in (running & ~hit).nonzero().flatten().tolist():
                tail = self.tokenizer.decode(input_ids[b, start:].tolist())
                hit[b] = any(s in tail for s in self.stop)
        self.finished_at[hit] = step
        return (self.finished_at >= 0).to(input_ids.device)


class HFEngine:
    """A transformers causal LM as a :class:`~megatron_t1.rollout.engine.RolloutEngine` (CPU default).

    Args:
        model: a ``PreTrainedModel`` with an LM head (e.g. ``Qwen2ForCausalLM``).
        tokenizer: its tokenizer (EOS and pad ids, decoding, text prompts).
        max_batch_sequences: at most this many sequences (prompts x n) per ``generate`` call.
    """

    def __init__(self, model, tokenizer, *, max_batch_sequences: int = 256) -> None:
        self.model = model.eval()
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

    def _generation_config(self, params: SamplingParams, n: int):
        from transformers import GenerationConfig

        # Warpers off: _TemperedSampler does temperature and filtering (see the module docstring).
        return GenerationConfig(
            do_sample=params.temperature > 0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            min_p=None,
            max_new_tokens=params.max_tokens,
            num_return_sequences=n,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    @torch.no_grad()
    def _generate_batch(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams
    ) -> list[PromptCompletions]:
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at column width - 1
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        sampler = _TemperedSampler(params)
        recorder = _Recorder(sampler, width, self.eos_ids, params.stop, self.tokenizer)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=self._generation_config(params, n),
            logits_processor=[sampler],
            stopping_criteria=[recorder],
        )
        seqs = out[:, width:].cpu()
        if not recorder.logprobs:
            raise EngineError("generate produced no tokens")
        logps = torch.stack(recorder.logprobs, dim=1).cpu()  # [B, steps]
        finished = recorder.finished_at.tolist()
        results = []
        for i, p in enumerate(prompt_ids):
            comps = []
            for j in range(n):
                b = i * n + j
                stop_at = finished[b] if finished[b] >= 0 else None
                length = stop_at if stop_at is not None else min(seqs.shape[1], params.max_tokens)
                toks = seqs[b, :length].tolist()
                comps.append(
                    Completion(
                        token_ids=toks,
                        text=self.tokenizer.decode(toks, skip_special_tokens=True),
                        logprobs=logps[b, :length].tolist(),
                        finish_reason=finish_reason(length, params.max_tokens, stop_at is not None),
                    )
                )
            results.append(PromptCompletions(prompt_token_ids=list(p), completions=comps))
        return results

    def generate(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> list[PromptCompletions]:
        """``n`` samples per prompt; log-probs of the sampling distribution (module docstring)."""
        check_prompts(prompts, n)
        prompt_ids = [self._token_ids(p) for p in prompts]
        vocab = self.model.get_input_embeddings().weight.shape[0]
        for i, p in enumerate(prompt_ids):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        per_call = max(1, self.max_batch_sequences // n)
        if params.seed is not None:
            rng = torch.random.fork_rng(devices=[])  # a seeded request leaves the global RNG alone
        else:
            rng = contextlib.nullcontext()
        results: list[PromptCompletions] = []
        with rng:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompt_ids), per_call):
                results.extend(self._generate_batch(prompt_ids[start : start + per_call], n, params))
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
        a tied model is the embedding itself, so sending it too is harmless. Unknown names and
        shape mismatches raise ``ValueError`` naming the tensor."""
        targets = self.model.state_dict(keep_vars=True)
        loaded = 0
        for name, tensor in named_tensors:
            dst = targets.get(name)
            if dst is None:
                raise ValueError(f"update_weights: {name} is not a tensor of the rollout model")
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"update_weights: {name} has shape {tuple(tensor.shape)}, the model {tuple(dst.shape)}"
                )
            dst.data.copy_(tensor)
            loaded += 1
        return loaded

    def close(self) -> None:
        self.model = None
