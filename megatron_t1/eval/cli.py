"""``python -m megatron_t1 eval``: pass@1 on benchmarks and the inference-scaling sweep.

    python -m megatron_t1 eval --checkpoint runs/rl/checkpoints --benchmarks math500,aime2024,gpqa \\
        --data-dir data/benchmarks --n 32 --out runs/eval/rl
    python -m megatron_t1 eval --checkpoint sft=runs/sft/checkpoints --checkpoint rl=runs/rl/checkpoints \\
        --benchmarks aime2024 --data-dir data/benchmarks --n 8 --budgets 1024,2048,4096,8192,16384

A checkpoint is an HF folder (config.json + safetensors) or a Megatron checkpoint of ours (a run's
``checkpoints/`` folder, which follows ``latest``, or one ``step_*`` folder); the latter is exported
to ``OUT/hf/LABEL`` first (tokenizer files from ``--tokenizer`` or the checkpoint's
``model.tokenizer``). Each checkpoint is loaded into a rollout engine (transformers on CPU, or vLLM),
samples ``n`` responses per problem with THE prompt template, and T1's reward (one scorer pool for
the whole run) scores them. Outputs in the run folder ``--out``, each written atomically:

* ``responses.jsonl``: every response with its extracted answer, reward, reason and tokens;
* ``results.json`` / ``results.csv``: pass@1 +- standard error per benchmark, subject and level;
* with ``--budgets``: ``scaling.csv``, ``scaling_responses.jsonl`` (the summarising passes) and
  ``scaling.png`` (accuracy vs budget, one curve per checkpoint). Tables are printed as well.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from megatron_t1.atomic import write_text_atomic
from megatron_t1.eval.loaders import EvalProblem, load_benchmark
from megatron_t1.eval.phases import benchmark_phase, scaling_phase
from megatron_t1.eval.scaling import Summariser

__all__ = ["add_arguments", "main", "resolve_checkpoint", "run", "run_eval"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` command's flags to ``parser``."""
    g = parser.add_argument_group("what to evaluate")
    g.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="[LABEL=]DIR",
        help="HF folder or Megatron checkpoint (run's checkpoints/ or a step folder); repeat for "
        "several checkpoints (one curve each in the scaling plot)",
    )
    g.add_argument(
        "--benchmarks",
        required=True,
        help="comma-separated names found under --data-dir (math500, aime2024, omni_math500, "
        "omni_math, gpqa, or any NAME with NAME.jsonl) or NAME=PATH",
    )
    g.add_argument("--data-dir", default=None, help="folder with the benchmark files (nothing is downloaded)")
    g.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (smoke runs)")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for Megatron checkpoints whose export carries none",
    )
    g = parser.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=32, help="samples per problem; pass@1 is their mean (default 32)")
    g.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    g.add_argument("--max-new-tokens", type=int, default=16384, help="generation budget (default 16384)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--system", default=None, help="optional system message of the prompt template")
    g.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine (default hf)")
    g.add_argument("--dtype", default="float32", help="engine dtype (float32, bfloat16)")
    g.add_argument("--device", default="cpu", help="HF engine: torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument(
        "--batch-sequences",
        type=int,
        default=256,
        help="HF engine: sequences (prompts x n) per generate call",
    )
    g = parser.add_argument_group("inference scaling")
    g.add_argument(
        "--budgets",
        type=_int_list,
        default=None,
        metavar="N1,N2,...",
        help="thinking budgets for the sweep (each <= --max-new-tokens); off when absent",
    )
    g.add_argument(
        "--summary-max-tokens",
        type=int,
        default=512,
        help="generation limit of the summarising pass (default 512)",
    )
    g.add_argument(
        "--summariser",
        default=None,
        metavar="HF_DIR",
        help="a separate summariser model (default: each checkpoint summarises itself)",
    )
    g.add_argument(
        "--scaling-limit",
        type=int,
        default=None,
        metavar="N",
        help="run the sweep on the first N problems of each benchmark only (default: all)",
    )
    g = parser.add_argument_group("scoring and output")
    g.add_argument("--out", default="runs/eval", help="run folder (default runs/eval)")
    g.add_argument("--num-workers", type=int, default=2, help="reward worker processes (default 2)")
    g.add_argument("--keep-hf", action="store_true", help="keep the HF exports of Megatron checkpoints")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        f.suffix in (".safetensors", ".bin") for f in p.iterdir() if f.is_file()
    )


def _split_label(spec: str) -> tuple[str | None, str]:
    label, sep, path = spec.partition("=")
    if sep and label and "/" not in label and not Path(spec).exists():
        return label, path
    return None, spec


def resolve_checkpoint(
    spec: str,
    work_dir: str | os.PathLike,
    *,
    tokenizer: str | None = None,
) -> tuple[str, Path, bool]:
    """``[LABEL=]DIR`` -> ``(label, hf_dir, exported)``.

    An HF folder is used as it is. A Megatron checkpoint of ours is exported to
    ``work_dir/hf/<label>`` (``exported`` True); when the export has no tokenizer files they are
    copied from ``tokenizer`` or from the checkpoint's ``model.tokenizer``.

    Raises:
        CheckpointError: neither layout, or no tokenizer for the export.
    """
    from megatron_t1.errors import CheckpointError

    label, path = _split_label(spec)
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {p}")
    if _is_hf_dir(p):
        return label or p.name, p, False
    from megatron_t1.convert.maps import ConvertError
    from megatron_t1.convert.offline import mcore_to_hf
    from megatron_t1.convert.torch_dist import read_checkpoint_metadata, resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(p)
    try:
        meta = read_checkpoint_metadata(ckpt)
    except ConvertError as e:
        raise CheckpointError(
            f"{p}: neither an HF folder (config.json + weights) nor a megatron_t1 checkpoint ({e})"
        ) from None
    if label is None:
        run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
        label = f"{run}/{ckpt.name}" if run else ckpt.name
    out = Path(work_dir) / "hf" / label.replace("/", "__")
    if out.exists():
        shutil.rmtree(out)
    try:
        mcore_to_hf(ckpt, out, progress=False)
    except ConvertError as e:
        raise CheckpointError(f"{ckpt}: export to HF failed: {e}") from None
    if not any((out / f).is_file() for f in _TOKENIZER_FILES):
        src = tokenizer or (meta.get("model") or {}).get("tokenizer")
        if not src or not Path(src).is_dir():
            shutil.rmtree(out, ignore_errors=True)
            raise CheckpointError(
                f"{ckpt}: the export has no tokenizer and model.tokenizer={src!r} is not a "
                "folder here; pass --tokenizer DIR"
            )
        for f in Path(src).iterdir():
            if f.is_file() and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    return label, out, True


def _load_engine(
    hf_dir: Path,
    *,
    engine: str,
    dtype: str,
    seed: int,
    batch_sequences: int,
    max_new_tokens: int,
    device: str = "cpu",
):
    if engine == "hf":
        from megatron_t1.rollout.hf_engine import HFEngine

        return HFEngine.from_pretrained(
            hf_dir, dtype=dtype, max_batch_sequences=batch_sequences, device=device
        )
    from megatron_t1.config import RolloutConfig
    from megatron_t1.rollout.engine import build_engine

    return build_engine(
        RolloutConfig(engine="vllm", max_new_tokens=max_new_tokens), str(hf_dir), seed=seed, dtype=dtype
    )


@contextlib.contextmanager
def _loaded_checkpoint(
    spec: str,
    work_dir: Path,
    *,
    tokenizer: str | None,
    keep_hf: bool,
    log: Callable[[str], None],
    **engine_kw,
) -> Iterator[tuple[str, object, object]]:
    """``(label, engine, tokenizer)`` of the checkpoint ``spec`` for the block; then the engine is
    closed and, unless ``keep_hf``, the HF export of a Megatron checkpoint removed."""
    from transformers import AutoTokenizer

    label, hf_dir, exported = resolve_checkpoint(spec, work_dir, tokenizer=tokenizer)
    try:
        if exported:
            log(f"[eval] {spec}: exported to {hf_dir}")
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        engine = _load_engine(hf_dir, **engine_kw)
        try:
            yield label, engine, tok
        finally:
            engine.close()
    finally:
        if exported and not keep_hf:
            shutil.rmtree(hf_dir, ignore_errors=True)
            hf = work_dir / "hf"
            if hf.is_dir() and not any(hf.iterdir()):
                hf.rmdir()


def _load_summariser(hf_dir: str, *, system: str | None, **engine_kw) -> Summariser:
    """A separate summariser model (``--summariser``): its own engine, tokenizer and chat template."""
    from transformers import AutoTokenizer

    engine = _load_engine(Path(hf_dir), **engine_kw)
    return Summariser(engine, AutoTokenizer.from_pretrained(hf_dir), False, system)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _json_safe(obj):
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def run_eval(
    checkpoints: Sequence[str],
    benchmarks: dict[str, list[EvalProblem]],
    out_dir: str | os.PathLike,
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int = 0,
    budgets: Sequence[int] | None = None,
    summary_max_tokens: int = 512,
    summariser_dir: str | None = None,
    scaling_limit: int | None = None,
    engine: str = "hf",
    dtype: str = "float32",
    device: str = "cpu",
    batch_sequences: int = 256,
    system: str | None = None,
    tokenizer: str | None = None,
    reward_config=None,
    keep_hf: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate every checkpoint on every benchmark (and sweep budgets); write the run folder.

    The benchmark phase (:func:`~megatron_t1.eval.phases.benchmark_phase`) runs inside the scaling
    phase (:func:`~megatron_t1.eval.phases.scaling_phase`, with ``budgets``), which sweeps each
    benchmark's samples while their checkpoint is loaded; ``results.json`` comes last.

    Returns the content of ``results.json`` (``benchmarks``: one dict per (checkpoint, benchmark)
    as :meth:`~megatron_t1.eval.benchmark.BenchmarkResult.to_dict`; ``scaling``: the table rows).
    ``scaling_limit`` runs the budget sweep on the first N problems of each benchmark only (the
    plain evaluation still covers all of them).
    """
    import dataclasses

    from megatron_t1.reward import RewardConfig, RewardScorer
    from megatron_t1.rollout.engine import SamplingParams

    t0 = time.perf_counter()
    if scaling_limit is not None and scaling_limit < 1:
        raise ValueError(f"scaling_limit={scaling_limit}: must be >= 1 (or None for every problem)")
    if budgets and max(budgets) > max_new_tokens:
        raise ValueError(
            f"budget {max(budgets)} > max_new_tokens={max_new_tokens}: the sweep truncates "
            "samples generated with the full budget"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = SamplingParams(
        temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens, seed=seed
    )
    rcfg = reward_config if reward_config is not None else RewardConfig()
    engine_kw = dict(engine=engine, dtype=dtype, seed=seed, batch_sequences=batch_sequences, device=device)
    load = functools.partial(
        _loaded_checkpoint,
        work_dir=out,
        tokenizer=tokenizer,
        keep_hf=keep_hf,
        log=log,
        max_new_tokens=max_new_tokens,
        **engine_kw,
    )
    load_summariser = None
    if summariser_dir is not None:
        load_summariser = functools.partial(
            _load_summariser, summariser_dir, system=system, max_new_tokens=summary_max_tokens, **engine_kw
        )
    with RewardScorer(rcfg) as scorer:
        scaling_cm = contextlib.nullcontext()
        if budgets:
            scaling_cm = scaling_phase(
                out,
                budgets,
                scorer,
                summary_params=SamplingParams(temperature=0.0, max_tokens=summary_max_tokens, seed=seed),
                scaling_limit=scaling_limit,
                load_summariser=load_summariser,
                system=system,
                log=log,
            )
        with scaling_cm as scaling:
            results = benchmark_phase(
                checkpoints,
                benchmarks,
                out,
                scorer,
                load=load,
                n=n,
                params=params,
                system=system,
                on_samples=scaling.sweep if scaling is not None else None,
                log=log,
            )
    scaling_rows = scaling.rows if scaling is not None else []
    summary = {
        "checkpoints": list(checkpoints),
        "settings": {
            "n": n,
            "temperature": temperature,
            "top_p": params.top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "budgets": list(budgets or []),
            "summary_max_tokens": summary_max_tokens,
            "summariser": summariser_dir,
            "scaling_limit": scaling_limit,
            "engine": engine,
            "dtype": dtype,
            "system": system,
            "reward": dataclasses.asdict(rcfg),
        },
        "benchmarks": [r.to_dict() for r in results],
        "scaling": _json_safe(scaling_rows),
        "files": {"responses": "responses.jsonl", "results_csv": "results.csv"},
    }
    if scaling_rows:
        summary["files"].update(
            scaling_csv="scaling.csv", scaling_png="scaling.png", scaling_responses="scaling_responses.jsonl"
        )
    summary["wall_seconds"] = time.perf_counter() - t0
    write_text_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n", newline="")
    log(
        f"\n[eval] wrote {out}/results.json, results.csv, responses.jsonl"
        + (", scaling.csv, scaling.png" if scaling_rows else "")
    )
    return summary


def run(args: argparse.Namespace) -> int:
    """The ``eval`` command; returns the exit code (2: a user error, printed on one line)."""
    from megatron_t1.data.io import DataError
    from megatron_t1.errors import CheckpointError
    from megatron_t1.reward import RewardConfig

    try:  # argument and data errors first, before any model is loaded
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.budgets and max(args.budgets) > args.max_new_tokens:
            raise ValueError(
                f"--budgets: {max(args.budgets)} > --max-new-tokens={args.max_new_tokens} (the sweep "
                "truncates samples generated with the full budget)"
            )
        benchmarks = {}
        for spec in [s for s in args.benchmarks.split(",") if s.strip()]:
            name, problems = load_benchmark(spec.strip(), args.data_dir, limit=args.limit)
            if name in benchmarks:
                raise ValueError(f"benchmark {name!r} given twice")
            benchmarks[name] = problems
            print(f"[eval] {name}: {len(problems)} problems")
        reward_config = RewardConfig(num_workers=args.num_workers)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_eval(
            args.checkpoint,
            benchmarks,
            args.out,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            budgets=args.budgets,
            summary_max_tokens=args.summary_max_tokens,
            summariser_dir=args.summariser,
            scaling_limit=args.scaling_limit,
            engine=args.engine,
            dtype=args.dtype,
            device=args.device,
            batch_sequences=args.batch_sequences,
            system=args.system,
            tokenizer=args.tokenizer,
            reward_config=reward_config,
            keep_hf=args.keep_hf,
            log=lambda m: print(m, flush=True),
        )
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # e.g. --engine vllm without vLLM installed
        print(f"error: --engine {args.engine}: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m megatron_t1.eval.cli``), the same flags as ``eval``."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_t1 eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
