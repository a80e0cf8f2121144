"""Resident memory around one NF4 load of SmolLM2-135M, in this process: quantcore or transformers.

Prints RSS and its high-water mark (MiB, from /proc/self/status) before the load, after it, and
after one forward. Usage: ``python bench/measure_load_rss.py qc|tf`` (run ``prepare_models.py`` first).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    warnings.simplefilter("ignore")
    import transformers
    from quantcore_bnb import BitsAndBytesConfig

    import quantcore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    quantcore.available_backends()
    library = sys.argv[1] if len(sys.argv) > 1 else "qc"
    config = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    path = _common.SMOLLM2_BF16_DIR
    print("before load: rss", _status("VmRSS"), "peak", _status("VmHWM"))
    if library == "qc":
        model = quantcore.from_pretrained(path, BitsAndBytesConfig(**config), dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(**config)
        )
    print("after load: rss", _status("VmRSS"), "peak", _status("VmHWM"))
    with torch.no_grad():
        model(torch.arange(16)[None])
    print("after forward: rss", _status("VmRSS"), "peak", _status("VmHWM"))


if __name__ == "__main__":
    main()
