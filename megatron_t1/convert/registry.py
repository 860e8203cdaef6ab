"""Dispatch on the HF ``architectures`` field (or our ``ModelConfig.arch``) to an :class:`ArchSpec`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_t1.convert import glm, llama, qwen2, qwen3, qwen3_moe
from megatron_t1.convert.maps import ArchSpec, ConvertError

SPECS: tuple[ArchSpec, ...] = (qwen2.SPEC, llama.SPEC, glm.SPEC, qwen3.SPEC, qwen3_moe.SPEC)
"""Every supported architecture (immutable: add a module and list its SPEC here)."""


def supported_architectures() -> list[str]:
    return [s.hf_architecture for s in SPECS]


def spec_for_hf_architectures(archs: Sequence[str] | str | None, *, where: str = "config.json") -> ArchSpec:
    """The spec of the first known entry of an HF ``architectures`` list."""
    if isinstance(archs, str):
        archs = [archs]
    for a in archs or []:
        for s in SPECS:
            if s.hf_architecture == a:
                return s
    raise ConvertError(
        f"{where}: unsupported architecture {list(archs or [])}; supported: {supported_architectures()}"
    )


def spec_for_arch(arch: str) -> ArchSpec:
    """The spec of our family name (``ModelConfig.arch``: qwen2, qwen3, qwen3_moe, llama, glm)."""
    for s in SPECS:
        if s.name == arch:
            return s
    raise ConvertError(f"unknown model.arch {arch!r}; supported: {[s.name for s in SPECS]}")


def read_hf_config(hf_dir: str | Path) -> dict:
    """``config.json`` of an HF folder as a dict (errors name the file)."""
    p = Path(hf_dir) / "config.json"
    if not p.is_file():
        raise ConvertError(f"no config.json in {hf_dir}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{p}: not valid JSON ({e})") from None


def model_config_from_hf_dir(hf_dir: str | Path) -> tuple[ArchSpec, Any, dict]:
    """``(spec, ModelConfig, raw config.json dict)`` of an HF model folder."""
    from megatron_t1.config import ModelConfig, model_config_from_hf

    raw = read_hf_config(hf_dir)
    spec = spec_for_hf_architectures(raw.get("architectures"), where=str(Path(hf_dir) / "config.json"))
    rope = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or (raw.get("rope_parameters") or {}).get("rope_type")
    if rope_type not in (None, "default"):
        # Megatron's GPTModel here builds plain RoPE: a scaled RoPE would convert silently wrong.
        raise ConvertError(
            f"{hf_dir}/config.json: rope scaling {rope_type!r} is not supported by the converter"
        )
    mc = ModelConfig(**model_config_from_hf(hf_dir))
    # transformers 5 keeps partial_rotary_factor inside rope_parameters, 4.x at the top level.
    prf = raw.get("partial_rotary_factor", (raw.get("rope_parameters") or {}).get("partial_rotary_factor"))
    prf = float(prf) if prf is not None else (0.5 if spec.name == "glm" else 1.0)
    if prf != mc.rotary_percent:
        raise ConvertError(
            f"{hf_dir}/config.json: partial_rotary_factor {prf} but model.rotary_percent {mc.rotary_percent}"
        )
    return spec, mc, raw
