"""HF <-> Megatron-Core conversion: pure per-tensor maps, TP/PP sharding, streaming checkpoint I/O.

No megatron import anywhere in this package (STYLE.md, point 1); ``megatron_t1.mcore.convert_io``
adds what needs a live model. Shared by ``tools/convert_ckpt.py`` and weight sync:

* :func:`iter_hf_tensors_from_megatron` / :func:`iter_megatron_tensors_from_hf`: streams over full
  (TP-merged, global layer index) Megatron tensors and HF-named tensors.
* :func:`split_tp` / :func:`merge_tp` / :func:`shard_tp` / :func:`tp_rule` and
  :func:`layer_range` / :func:`layer_offset`: TP and PP layouts.
* :func:`spec_for_hf_architectures` / :func:`spec_for_arch`: the per-architecture maps.
"""

from megatron_t1.convert.maps import (
    ArchSpec,
    ConvertError,
    Dims,
    TensorMap,
    from_hf,
    iter_hf_tensors_from_megatron,
    iter_megatron_tensors_from_hf,
    to_hf,
)
from megatron_t1.convert.registry import (
    SPECS,
    spec_for_arch,
    spec_for_hf_architectures,
    supported_architectures,
)
from megatron_t1.convert.sharding import (
    check_layout,
    layer_offset,
    layer_range,
    merge_tp,
    shard_tp,
    shift_layer,
    split_tp,
    tp_rule,
)

__all__ = [
    "SPECS",
    "ArchSpec",
    "ConvertError",
    "Dims",
    "TensorMap",
    "check_layout",
    "from_hf",
    "iter_hf_tensors_from_megatron",
    "iter_megatron_tensors_from_hf",
    "layer_offset",
    "layer_range",
    "merge_tp",
    "shard_tp",
    "shift_layer",
    "spec_for_arch",
    "spec_for_hf_architectures",
    "split_tp",
    "supported_architectures",
    "to_hf",
    "tp_rule",
]
