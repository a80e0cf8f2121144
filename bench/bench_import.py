"""Import cost: ``import quantcore`` vs the incumbent's, and the cost of first plugin discovery.

Each figure is the best of N fresh interpreters (``python -c ...``), so caches of the measuring
process don't leak in. Run: ``python bench/bench_import.py [--repeats 7] [--json OUT]``.

- ``python -c pass``: the interpreter's own start-up (subtracted from the others).
- ``import quantcore``: must load no plugin and no heavy package (no torch either).
- ``quantcore.available_backends()``: entry-point discovery plus each plugin's registration.
- ``from transformers import BitsAndBytesConfig``: what a transformers user pays for the same config.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = {
    "python -c pass": "pass",
    "import quantcore": "import quantcore",
    "quantcore.available_backends()": "import quantcore; quantcore.available_backends()",
    "import quantcore + torch": "import quantcore, torch",
    "from transformers import BitsAndBytesConfig": "from transformers import BitsAndBytesConfig",
}


def best_time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {name: best_time(code, args.repeats) for name, code in CASES.items()}
    base = results["python -c pass"]
    print(f"{'case':48} {'best (s)':>9} {'minus start-up (s)':>19}")
    for name, seconds in results.items():
        print(f"{name:48} {seconds:9.3f} {seconds - base:19.3f}")
    qc = results["import quantcore"] - base
    tf = results["from transformers import BitsAndBytesConfig"] - base
    print(
        f"\nimport quantcore costs {qc * 1000:.0f} ms; transformers' BitsAndBytesConfig import {tf * 1000:.0f} ms "
        f"({tf / qc:.0f}x more)"
        if qc > 0
        else ""
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"best_seconds": results, "repeats": args.repeats}, fh, indent=2)


if __name__ == "__main__":
    main()
