"""The hooks a quantcore plugin can implement.

A plugin is a module (or object) with functions decorated by ``quantcore.hookimpl`` and named
after the specs below, exposed through the ``quantcore`` entry-point group::

    [project.entry-points.quantcore]
    my_backend = "my_backend.plugin"
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("quantcore")
hookimpl = HookimplMarker("quantcore")


@hookspec
def register_backends(register):
    """Contribute quantization backends.

    Called once, the first time quantcore needs its backends (not at ``import quantcore``). Call
    ``register(backend)`` once per :class:`quantcore.Backend` this plugin provides; return nothing.
    Import heavy packages (the backend's kernels) inside the quantizer's methods, not here, so that
    listing backends stays cheap and works where those packages are missing.

    :param register: ``register(backend: quantcore.Backend) -> None``.
    """


@hookspec
def before_quantize(model, config, plan):
    """Called before a quantize call changes anything.

    Log, measure or veto: raise any exception (``quantcore.QuantizationVetoed`` reads best) to
    stop the quantization; the model is then left untouched and the caller gets a
    ``QuantizationVetoed`` naming this plugin. The return value is ignored.

    :param model: the ``torch.nn.Module`` about to be quantized.
    :param config: the main quantization config of the call.
    :param plan: the :class:`quantcore.QuantizationReport` of what is about to happen (a dry run).
    """


@hookspec
def after_quantize(model, config, report):
    """Called after a quantize call replaced the modules.

    For logging and measuring; the return value is ignored. An exception raised here is reported
    as a warning naming the plugin and does not undo the quantization.

    :param model: the quantized ``torch.nn.Module``.
    :param config: the main quantization config of the call.
    :param report: the :class:`quantcore.QuantizationReport` of what was done.
    """
