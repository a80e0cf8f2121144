"""``GPTQConfig``: the field names and meaning of transformers' ``GPTQConfig``.

A dict written by transformers (``GPTQConfig.to_dict()``), by GPTQModel or AutoGPTQ
(``quantize_config.json``) or found as a Hub checkpoint's ``quantization_config`` loads here; the
keys those tools add for their own bookkeeping (``model_name_or_path``, ``static_groups``,
``pack_dtype``, ...) are dropped on loading (:data:`TOOLING_KEYS`). Our ``to_dict()`` loads in
transformers.

Fields that steer transformers' or GPTQModel's own machinery (kernel choice, exllama buffers, how
they batch a dataset) are accepted with the meaning their help gives here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from quantcore import QuantizationConfigMixin, config_field, define_config

__all__ = ["DATASET_NAMES", "TOOLING_KEYS", "GPTQConfig"]

DATASET_NAMES = ("wikitext2", "c4", "c4-new")
"""Dataset names transformers accepts in ``dataset`` (it downloads them; quantcore does not)."""

TOOLING_KEYS = frozenset(
    {
        # AutoGPTQ / GPTQModel quantize_config.json
        "model_name_or_path",
        "model_file_base_name",
        "is_marlin_format",
        "static_groups",
        "lm_head",
        "pack_dtype",
        "v2",
        "v2_alpha",
        "mse",
        "damp_auto_increment",
        "dynamic",
        "true_sequential_strategy",
        "hyb_act",
        "mock_quantization",
        "adapter",
        "rotation",
        "parallel_packing",
        "device",
        "offload_to_disk",
        "offload_to_disk_path",
        # GPTQModel 7.x writes its method name ("gptq") beside quant_method in config.json
        "method",
        # older transformers GPTQConfig fields (kernel switches)
        "use_cuda_fp16",
        "use_exllama",
        "disable_exllama",
        "exllama_config",
    }
)
"""Keys written by other GPTQ tools that change nothing here: dropped when a dict is loaded."""


def _group_size(value: int) -> str | None:
    return None if value == -1 or value > 0 else "expected a positive group size, or -1 for one group per row"


def _damp(value: float) -> str | None:
    return None if 0 < value < 1 else "expected a fraction of the mean Hessian diagonal, strictly between 0 and 1"


def _positive_or_none(value: int | None) -> str | None:
    return None if value is None or value > 0 else "expected a positive number or null"


@define_config
class GPTQConfig(QuantizationConfigMixin):
    """GPTQ: weights quantized column by column, each rounding error spread over the columns not
    yet quantized in proportion to the inverse Hessian of the layer's calibration inputs.

    Weights are stored as unsigned ``bits``-bit codes with one fp16 scale and one integer zero point
    per group of ``group_size`` input columns (per output row), in the GPTQ checkpoint format.

    >>> GPTQConfig(bits=4, sym=False).describe()
    'gptq int4 g128 asym'
    """

    quant_method: ClassVar[str] = "gptq"

    bits: Literal[2, 3, 4, 8] = config_field(help="Bits per weight: 2, 3, 4 or 8.")
    tokenizer: Any = config_field(
        default=None,
        help="A tokenizer (object, or the path of a folder holding one) that turns `dataset` into "
        "calibration batches; only used when quantize() gets no calibration= argument.",
    )
    dataset: list[str] | str | None = config_field(
        default=None,
        help="Calibration texts, tokenized with `tokenizer` when quantize() gets no calibration= argument "
        "(one text per batch, cut to model_seqlen tokens). transformers' names wikitext2/c4/c4-new are "
        "accepted in configs but not downloaded: pass the texts.",
    )
    group_size: int = config_field(
        default=128,
        check=_group_size,
        help="Input columns sharing one scale and zero point; -1: one group per output row.",
    )
    damp_percent: float = config_field(
        default=0.1,
        check=_damp,
        help="Dampening added to the Hessian diagonal, as a fraction of its mean (raised automatically "
        "if the Hessian is still not positive definite).",
    )
    desc_act: bool = config_field(
        default=False,
        help="Act-order: quantize columns by decreasing Hessian diagonal (activation energy). Better "
        "accuracy; g_idx then maps each column to its group and the fast int4 path does not apply.",
    )
    act_group_aware: bool = config_field(
        default=True,
        help="GPTQModel's group-aware activation order; accepted for compatibility, quantcore quantizes "
        "in natural column order when desc_act is false.",
    )
    sym: bool = config_field(
        default=True,
        help="Symmetric quantization: the zero point is fixed at 2^(bits-1); false fits it per group.",
    )
    true_sequential: bool = config_field(
        default=True,
        help="Within a block, quantize the layers in the order the forward uses them (q/k/v, then o, "
        "then up/gate, then down), each from the outputs of the layers already quantized.",
    )
    format: Literal["gptq", "gptq_v2"] = config_field(
        default="gptq",
        help="Checkpoint format: 'gptq' (v1: zero points stored minus one, what transformers and "
        "AutoGPTQ read) or 'gptq_v2' (zero points as they are; GPTQModel).",
    )
    meta: dict[str, Any] | None = config_field(
        default=None, help="Tool information (quantizer name and version); stored, not interpreted."
    )
    backend: str | None = config_field(
        default=None, help="transformers/GPTQModel kernel choice; stored, not interpreted by quantcore."
    )
    model_seqlen: int | None = config_field(
        default=None,
        check=_positive_or_none,
        help="Most tokens per calibration text tokenized from `dataset` (default 2048).",
    )
    block_name_to_quantize: str | None = config_field(
        default=None,
        help="Qualified name of the nn.ModuleList of blocks to calibrate (model.layers); null infers it.",
    )
    module_name_preceding_first_block: list[str] | None = config_field(
        default=None,
        help="Accepted for compatibility; quantcore captures the first block's inputs with a hook instead.",
    )
    batch_size: int = config_field(
        default=1,
        check=lambda v: None if v > 0 else "expected a positive batch size",
        help="Accepted for compatibility; texts from `dataset` are fed one per batch.",
    )
    pad_token_id: int | None = config_field(
        default=None, help="Accepted for compatibility; texts from `dataset` are not padded."
    )
    max_input_length: int | None = config_field(
        default=None, help="exllama buffer size in transformers; stored, not interpreted by quantcore."
    )
    cache_block_outputs: bool = config_field(
        default=True, help="Accepted for compatibility; block outputs are always kept for the next block."
    )
    modules_in_block_to_quantize: list[list[str]] | None = config_field(
        default=None,
        help="transformers' sequential groups of a block's linears; loading checkpoints with it works "
        "(their tensors say what is quantized), quantizing with it is not supported yet.",
    )

    def validate(self) -> Iterable[tuple[str, str]]:
        if isinstance(self.dataset, str) and self.dataset not in DATASET_NAMES:
            yield "dataset", f"expected a list of texts or one of {', '.join(DATASET_NAMES)}, got {self.dataset!r}"

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """transformers' legacy ``checkpoint_format`` key wins over ``format`` (as in transformers);
        other tools' bookkeeping keys are dropped."""
        legacy = data.pop("checkpoint_format", None)
        if legacy is not None:
            data["format"] = legacy.lower() if isinstance(legacy, str) else legacy
        return {k: v for k, v in data.items() if k not in TOOLING_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """Every field, with ``checkpoint_format`` beside ``format`` as transformers writes it; a
        tokenizer object is written as its name or path (or null)."""
        out = super().to_dict()
        tokenizer = out.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            out["tokenizer"] = getattr(tokenizer, "name_or_path", None) or None
        out["checkpoint_format"] = out["format"]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        if "tokenizer" in out and not isinstance(out["tokenizer"], str):
            out["tokenizer"] = getattr(self.tokenizer, "name_or_path", None) or None
        return out

    def describe(self) -> str:
        """A short label for reports (``"gptq int4 g128 asym"``)."""
        group = "" if self.group_size == -1 else f" g{self.group_size}"
        parts = [f"gptq int{self.bits}{group}", "sym" if self.sym else "asym"]
        if self.desc_act:
            parts.append("act-order")
        return " ".join(parts)
