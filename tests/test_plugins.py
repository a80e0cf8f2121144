"""Plugin discovery, registration, disabling and fault containment, through pluggy itself."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import warnings

import pytest

import quantcore
from quantcore import BackendUnavailableError, ConfigError, PluginError, QuantizationVetoed
from quantcore.plugins import PluginWarning

from .half_backend import HalfConfig, make_plugin


def install_distribution(root, name: str, module_source: str, entry_name: str | None = None) -> None:
    """Put a real installed distribution (dist-info + module) with a ``quantcore`` entry point under ``root``."""
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[quantcore]\n{entry_name or name} = {module}\n")


GOOD_PLUGIN = """
import quantcore
from tests.half_backend import HalfConfig, HalfQuantizer

@quantcore.hookimpl
def register_backends(register):
    register(quantcore.Backend("half", HalfConfig, HalfQuantizer))
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def methods() -> dict[str, quantcore.BackendInfo]:
    return {b.quant_method: b for b in quantcore.available_backends()}


def test_plugin_registered_at_run_time_is_listed_and_used(tiny_lm):
    name = quantcore.register_plugin(make_plugin("half"))
    info = methods()["half"]
    assert (info.plugin, info.usable, info.reason, info.distribution) == (name, True, None, None)
    report = quantcore.quantize(tiny_lm, {"quant_method": "half"})
    assert len(report.quantized) == 12


def test_entry_point_distribution_is_discovered_with_its_version(site):
    install_distribution(site, "qc-half", GOOD_PLUGIN)
    info = methods()["half"]
    assert (info.plugin, info.distribution, info.version, info.usable) == ("qc-half", "qc-half", "1.2.3", True)
    assert "qc-half" in quantcore.get_plugin_manager().list_name_plugin()[0]


def test_plugin_failing_to_import_is_reported_and_others_keep_working(site):
    install_distribution(site, "qc-broken", "raise ImportError('needs libfoo.so')")
    quantcore.register_plugin(make_plugin("half"))
    with pytest.warns(PluginWarning, match=r"'qc-broken'.*ImportError: needs libfoo.so"):
        rows = methods()
    assert rows["half"].usable
    assert {p["name"]: p["error"] for p in quantcore.list_plugins()}["qc-broken"] == "ImportError: needs libfoo.so"


def test_plugin_raising_in_its_hook_is_left_out(site):
    install_distribution(
        site,
        "qc-raiser",
        """
        import quantcore
        @quantcore.hookimpl
        def register_backends(register):
            raise RuntimeError("boom")
    """,
    )
    quantcore.register_plugin(make_plugin("half"))
    with pytest.warns(PluginWarning, match=r"'qc-raiser' raised in register_backends.*RuntimeError: boom"):
        assert set(methods()) >= {"half"}


def test_conflicting_plugins_are_an_error_naming_both_until_one_is_disabled(site):
    install_distribution(site, "qc-half", GOOD_PLUGIN)
    quantcore.register_plugin(make_plugin("half"), name="other-half")
    with pytest.warns(PluginWarning, match="claimed by plugins 'qc-half' and 'other-half'"):
        rows = [b for b in quantcore.available_backends() if b.quant_method == "half"]
    assert [r.usable for r in rows] == [False, False]
    with pytest.raises(PluginError, match=r"'qc-half' \(qc-half\) and 'other-half'"):
        quantcore.AutoQuantizer.from_config({"quant_method": "half"})
    quantcore.disable_plugins("qc-half")
    assert methods()["half"].plugin == "other-half"
    assert quantcore.AutoQuantizer.from_config({"quant_method": "half"}).config == HalfConfig()


def test_env_var_disables_named_plugins(site, monkeypatch):
    install_distribution(site, "qc-half", GOOD_PLUGIN)
    monkeypatch.setenv("QUANTCORE_DISABLE_PLUGINS", "something-else, qc-half")
    quantcore.reset_plugins()
    assert "half" not in methods()
    with pytest.raises(ConfigError, match="unknown method 'half'"):
        quantcore.AutoQuantizationConfig.from_dict({"quant_method": "half"})


def test_api_switch_disables_and_reenables(site):
    install_distribution(site, "qc-half", GOOD_PLUGIN)
    quantcore.disable_plugins("qc-half")
    assert "half" not in methods()
    quantcore.enable_plugins("qc-half")
    assert "half" in methods()


def test_missing_requirement_makes_backend_unusable_with_install_hint(tiny_lm):
    quantcore.register_plugin(
        make_plugin("needy", requires=("surely-not-installed-pkg>=1",), hint="pip install 'quantcore[needy]'")
    )
    info = methods()["needy"]
    assert not info.usable
    assert info.reason == "surely-not-installed-pkg is not installed: pip install 'quantcore[needy]'"
    # the config still loads (validate a file without the kernels) ...
    assert quantcore.AutoQuantizationConfig.from_dict({"quant_method": "needy"}).quant_method == "needy"
    # ... but quantizing says what to install
    with pytest.raises(BackendUnavailableError, match=r"pip install 'quantcore\[needy\]'"):
        quantcore.quantize(tiny_lm, {"quant_method": "needy"})


def test_too_old_requirement_is_reported():
    quantcore.register_plugin(make_plugin("old", requires=("pluggy>=999",)))
    assert "is installed but pluggy>=999 is needed" in methods()["old"].reason


def test_unknown_and_missing_methods_list_installed_ones_and_known_providers():
    quantcore.register_plugin(make_plugin("half"))
    with pytest.raises(ConfigError, match=r"quant_method: missing; installed methods: .*'half'"):
        quantcore.AutoQuantizationConfig.from_dict({})
    with pytest.raises(ConfigError, match=r"unknown method 'hlaf' \(did you mean 'half'\?\)"):
        quantcore.AutoQuantizationConfig.from_dict({"quant_method": "hlaf"})
    quantcore.disable_plugins("quantcore-bnb", "bitsandbytes")
    with pytest.raises(ConfigError, match="provided by the plugin quantcore-bnb"):
        quantcore.AutoQuantizationConfig.from_dict({"quant_method": "bitsandbytes"})


def test_before_hook_can_veto_and_model_is_untouched(tiny_lm):
    quantcore.register_plugin(make_plugin("half"))
    seen = {}

    class Veto:
        @quantcore.hookimpl
        def before_quantize(model, config, plan):
            seen["plan"] = plan
            raise QuantizationVetoed("not on Fridays")

    quantcore.register_plugin(Veto, name="veto")
    before = dict(tiny_lm.named_modules())
    with pytest.raises(QuantizationVetoed, match=r"plugin 'veto' vetoed the quantization: .*not on Fridays"):
        quantcore.quantize(tiny_lm, {"quant_method": "half"})
    assert dict(tiny_lm.named_modules()) == before
    assert seen["plan"].dry_run and len(seen["plan"].quantized) == 12


def test_after_hook_sees_report_and_its_errors_only_warn(tiny_lm):
    quantcore.register_plugin(make_plugin("half"))
    reports = []

    class Observer:
        @quantcore.hookimpl
        def after_quantize(model, config, report):
            reports.append((config.quant_method, len(report.quantized)))

    class Broken:
        @quantcore.hookimpl
        def after_quantize(report):
            raise ValueError("disk full")

    quantcore.register_plugin(Observer, name="observer")
    quantcore.register_plugin(Broken, name="broken-observer")
    with pytest.warns(PluginWarning, match="'broken-observer' raised in after_quantize: ValueError: disk full"):
        report = quantcore.quantize(tiny_lm, {"quant_method": "half"})
    assert reports == [("half", 12)] and not report.dry_run


def test_import_is_lazy_and_light():
    code = (
        "import sys, json, quantcore, quantcore.plugins as p, quantcore.cli\n"
        "heavy = [m for m in ('bitsandbytes', 'transformers', 'peft', 'quantcore_bnb', 'quantcore_torch', 'torch', "
        "'quantcore.integrations') "
        "if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'loaded': p._state is not None}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"heavy": [], "loaded": False}


def test_installed_torch_backend_is_found_through_its_entry_point():
    pytest.importorskip("quantcore_torch", reason="the quantcore-torch distribution is not installed")
    from importlib.metadata import entry_points

    assert "torch" in {ep.name for ep in entry_points(group="quantcore")}
    info = methods()["torch_wo"]
    assert (info.plugin, info.distribution, info.usable) == ("torch", "quantcore-torch", True)


def test_plugin_warnings_do_not_repeat_for_cached_state(site):
    install_distribution(site, "qc-broken", "raise ImportError('x')")
    with pytest.warns(PluginWarning):
        methods()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        methods()  # cached: loaded once
