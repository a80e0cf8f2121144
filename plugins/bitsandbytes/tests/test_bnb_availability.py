"""Without bitsandbytes the plugin still imports, and the backend shows as unavailable with the hint."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import attrs
from quantcore_bnb.plugin import INSTALL_HINT

import quantcore

# Run in a fresh interpreter in which bitsandbytes can neither be imported nor found as installed.
HIDE_BITSANDBYTES = textwrap.dedent(
    """
    import importlib.abc, importlib.metadata, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes" or name.startswith("bitsandbytes."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    real_version = importlib.metadata.version

    def version(name):
        if name.lower() == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    importlib.metadata.version = version
    """
)

CHECKS = textwrap.dedent(
    """
    import torch, quantcore
    from quantcore_bnb import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert BitsAndBytesConfig.from_dict(config.to_dict()) == config
    (info,) = [b for b in quantcore.available_backends() if b.quant_method == "bitsandbytes"]
    assert not info.usable, info
    print("REASON:", info.reason)
    try:
        quantcore.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)
    except quantcore.BackendUnavailableError as exc:
        print("ERROR:", exc)
    assert "bitsandbytes" not in sys.modules
    """
)


def test_unavailable_without_bitsandbytes():
    done = subprocess.run(
        [sys.executable, "-c", HIDE_BITSANDBYTES + "\nimport sys\n" + CHECKS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"REASON: bitsandbytes is not installed: {INSTALL_HINT}" in done.stdout
    assert "ERROR: backend 'bitsandbytes' cannot run here: bitsandbytes is not installed" in done.stdout
    assert INSTALL_HINT in done.stdout.split("ERROR:")[1]


def test_requirement_too_old_is_reported():
    backend = quantcore.get_backend("bitsandbytes", require_usable=False)
    assert backend.requires == ("bitsandbytes>=0.48.0",)
    assert backend.install_hint == INSTALL_HINT
    # torch is installed wherever these tests run, bitsandbytes not always (tox -e core)
    too_new = attrs.evolve(backend, requires=("torch>=999",))
    (problem,) = too_new.missing_requirements()
    assert "is installed but torch>=999 is needed" in problem
    missing = attrs.evolve(backend, requires=("quantcore-no-such-package>=1",))
    assert missing.missing_requirements() == ["quantcore-no-such-package is not installed"]


def test_plugin_module_does_not_import_bitsandbytes():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, quantcore, quantcore_bnb, quantcore_bnb.plugin;"
            "quantcore.available_backends(); print('bitsandbytes' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
