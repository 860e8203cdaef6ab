"""The rollout-engine contract: K samples per prompt with the log-probs they were drawn with.

T1 (arXiv 2501.11651, Sec. 3.2) samples K = 64 responses per prompt at temperature ~1.2 from the
*current* policy. The trainer later scores the same tokens under ``logits / tau``, so an engine must
report, for every sampled token ``y_t``,

    log pi_sample(y_t | x, y_<t) = log softmax(filter(z_t / tau))[y_t]

where ``z_t`` are the model's logits and ``filter`` is top-k / top-p / min-p masking (the identity
for RL: top_p = 1, top_k = -1, min_p = 0, i.e. the *full tempered distribution*). vLLM reports the
raw ``log softmax(z_t)`` unless it runs with ``logprobs_mode="processed_logprobs"``; both engines
here report the processed one.

Every engine implements :class:`RolloutEngine`:

* ``generate(prompts, n, params, *, seeds=None) -> list[PromptCompletions]``: per prompt, ``n``
  samples. ``seeds[i]`` seeds prompt i's samples on their own (:func:`sample_seed`): the same prompt
  and seed give the same samples whatever else is in the batch, so rollouts dealt to several engines
  are those one engine would draw (up to floating-point differences of batched kernels).
* ``score(sequences) -> list[Tensor]``: untempered log-probs of given token sequences (the parity
  probe after a weight sync compares them with the trainer's).
* ``update_weights(named_tensors)``: load HF-named full tensors in place (the weight sync).
* ``sleep()``: free the accelerator for the trainer (colocated vLLM on GPU; a no-op elsewhere). The
  next ``generate`` / ``score`` / ``update_weights`` wakes what it needs.
* ``close()``.

:class:`RestartableEngine` wraps any engine built by a factory: a failure inside the engine is
re-raised as :class:`EngineError` carrying the engine's own error text, and ``restart()`` builds a
fresh engine (whose weights must then be synced again: ``needs_weights`` says so).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Prompt = str | Sequence[int]
"""A prompt: text that is already chat-templated, or its token ids."""

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """The rollout engine failed (crashed, rejected input, lost its server). The message carries the
    engine's own error; the run may :meth:`RestartableEngine.restart` the engine and go on."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Defaults are plain sampling at temperature 1 over the full distribution."""

    temperature: float = 1.0
    """Softmax temperature tau; 0 means greedy (log-probs are then the untempered ones)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 keeps every token (RL)."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all (RL)."""
    min_p: float = 0.0
    """Drop tokens with probability < min_p * max probability; 0 keeps all (RL)."""
    max_tokens: int = 256
    """Generation limit in tokens; a sample that reaches it has ``finish_reason == "length"``."""
    stop: tuple[str, ...] = ()
    """Stop strings (the stop string stays in the output); EOS always stops."""
    seed: int | None = None
    """Seed of this request (reproducible samples); None draws from the engine's generator."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):  # a bare string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def full_distribution(self) -> bool:
        """No top-p / top-k / min-p truncation: the sampler is exactly ``softmax(z / tau)``."""
        return self.top_p >= 1.0 and self.top_k in (-1, 0) and self.min_p <= 0.0

    @classmethod
    def from_config(cls, rollout_cfg: Any, *, seed: int | None = None) -> SamplingParams:
        """From a :class:`megatron_t1.config.RolloutConfig` (``min_p`` / ``stop`` if it has them)."""
        return cls(
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            top_k=rollout_cfg.top_k,
            min_p=getattr(rollout_cfg, "min_p", 0.0),
            max_tokens=rollout_cfg.max_new_tokens,
            stop=tuple(getattr(rollout_cfg, "stop", ()) or ()),
            seed=seed,
        )


@dataclass
class Completion:
    """One sampled response.

    ``token_ids`` [T] and ``logprobs`` [T] are aligned: ``logprobs[t]`` is the log-probability of
    ``token_ids[t]`` under the distribution it was sampled from (see the module docstring). The
    EOS token or the tokens of a stop string, when generated, are included.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    routed_experts: torch.Tensor | None = None
    """MoE policies with routing recorded (``rollout.record_routing``): int16 ``[T, layers, k]``, the
    experts each response token was routed to in each layer when the engine fed it to the model, -1
    where it was not (the last token is never fed; dense layers); None otherwise. Routing replay
    (``loss.routing_replay``) makes the trainer's forward use these."""

    @property
    def truncated(self) -> bool:
        """Hit the length limit (T1's over-long penalty applies)."""
        return self.finish_reason == "length"

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        check_routes(self.routed_experts, len(self.token_ids), "response")


@dataclass
class PromptCompletions:
    """The ``n`` samples of one prompt."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
    routed_experts: torch.Tensor | None = None
    """The prompt tokens' routing, int16 ``[P, layers, k]`` (as :attr:`Completion.routed_experts`)."""

    def __post_init__(self) -> None:
        check_routes(self.routed_experts, len(self.prompt_token_ids), "prompt")


def check_routes(routes: torch.Tensor | None, n_tokens: int, what: str) -> None:
    """A routing record is None or an integer ``[n_tokens, layers, k]`` tensor."""
    if routes is None:
        return
    if routes.dim() != 3 or routes.shape[0] != n_tokens or routes.dtype.is_floating_point:
        raise ValueError(
            f"{what} routing must be an integer [{n_tokens}, layers, k] tensor, got "
            f"{routes.dtype} {tuple(routes.shape)}"
        )


@runtime_checkable
class RolloutEngine(Protocol):
    """What the RL loop needs from an inference engine (HF transformers or vLLM)."""

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        """``n`` samples for every prompt, in prompt order. ``seeds``: one per prompt (default:
        :func:`prompt_seeds` of ``params.seed``)."""
        ...

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per sequence ``x`` of length L: float32 ``[L - 1]`` with ``log p(x_t | x_<t)`` for
        ``t = 1..L-1`` under the untempered model (temperature 1, no truncation)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named full tensors into the engine's model in place; returns how many were loaded.
        The tensors may be views into buffers the stream reuses: copy them as they come."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory until the next call (no-op where there is nothing to free)."""
        ...

    def close(self) -> None:
        """Release the engine (idempotent)."""
        ...


def sample_seed(*parts: int) -> int:
    """A 62-bit seed mixed from integers, e.g. ``(run seed, step, prompt index)``.

    A hash, not a sum: ``(seed, step + 1, i)`` and ``(seed, step, i + 1)`` give unrelated streams, and
    vLLM's per-sample seeds (``seed + j`` for the j-th of n samples) stay far apart.
    """
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # vLLM adds the sample index: stay inside int64


def prompt_seeds(params: SamplingParams, n_prompts: int, seeds: Sequence[int] | None = None) -> list[int]:
    """The per-prompt seeds of a ``generate`` call: ``seeds`` as given (checked), else
    ``sample_seed(params.seed, i)`` for prompt i, else fresh draws from torch's global generator
    (``params.seed`` None: not reproducible, as asked)."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n_prompts:
            raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
        return seeds
    if params.seed is not None:
        return [sample_seed(params.seed, i) for i in range(n_prompts)]
    return torch.randint(0, 2**62, (n_prompts,)).tolist()


def check_prompts(prompts: Sequence[Prompt], n: int) -> None:
    """Validate ``generate``'s arguments (an empty prompt or n < 1 is a caller error)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, got a single string")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")


def finish_reason(n_tokens: int, max_tokens: int, stopped: bool) -> FinishReason:
    """``"stop"`` when EOS or a stop string ended the sample, else ``"length"`` (it used
    ``max_tokens``; a sample whose last allowed token is EOS counts as stopped)."""
    if stopped:
        return "stop"
    if n_tokens < max_tokens:
        raise EngineError(f"sample ended after {n_tokens} < max_tokens={max_tokens} tokens without a stop")
    return "length"


class RestartableEngine:
    """An engine built by ``factory`` that reports failures as :class:`EngineError` and can be
    rebuilt. After a failure or a restart, ``needs_weights`` is True until the next successful
    ``update_weights`` (a fresh engine holds the factory's weights, not the policy's)."""

    def __init__(self, factory: Callable[[], RolloutEngine], *, name: str = "rollout engine") -> None:
        self._factory = factory
        self.name = name
        self.engine: RolloutEngine | None = factory()
        self.needs_weights = False
        self.restarts = 0

    def _call(self, what: str, fn: Callable[[RolloutEngine], Any]) -> Any:
        if self.engine is None:
            raise EngineError(f"{self.name} is not running (it failed earlier; call restart())")
        try:
            return fn(self.engine)
        except (ValueError, TypeError):  # rejected input (checked before any work): the engine is fine
            raise
        except Exception as e:
            self._discard()
            raise EngineError(
                f"{self.name} failed in {what}: {type(e).__name__}: {e}. "
                "Restart it with restart() and sync the weights again."
            ) from e

    def _discard(self) -> None:
        engine, self.engine = self.engine, None
        self.needs_weights = True
        if engine is not None:
            try:
                engine.close()
            except Exception:  # a crashed engine may not close cleanly; it is dropped either way
                pass

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        return self._call("generate", lambda e: e.generate(prompts, n, params, seeds=seeds))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self._call("score", lambda e: e.score(sequences))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        loaded = self._call("update_weights", lambda e: e.update_weights(named_tensors))
        self.needs_weights = False
        return loaded

    def sleep(self) -> None:
        self._call("sleep", lambda e: e.sleep())

    def restart(self) -> None:
        """Close the current engine (if any) and build a new one with the factory."""
        self._discard()
        self.engine = self._factory()
        self.restarts += 1

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def __getattr__(self, name: str) -> Any:
        # Engine-specific attributes (tokenizer, wake_up, ...) pass through.
        engine = self.__dict__.get("engine")
        if engine is None:
            raise AttributeError(name)
        return getattr(engine, name)


def build_engine(
    rollout_cfg: Any,
    model_dir: str,
    *,
    tokenizer_dir: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    **kwargs: Any,
) -> RolloutEngine:
    """The engine named by ``rollout_cfg.engine`` ("hf" or "vllm"), loaded from an HF folder.

    ``kwargs`` go to the engine's constructor (e.g. ``mode="server"`` for vLLM).
    """
    if rollout_cfg.engine == "hf":
        from megatron_t1.rollout.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, **kwargs)
    if rollout_cfg.engine == "vllm":
        from megatron_t1.rollout.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(
            rollout_cfg, model_dir, tokenizer_dir=tokenizer_dir, seed=seed, dtype=dtype, **kwargs
        )
    raise ValueError(f"rollout.engine must be 'hf' or 'vllm', got {rollout_cfg.engine!r}")
