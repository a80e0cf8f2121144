"""quantcore inside other libraries; each module here is imported only when asked for.

- :mod:`quantcore.integrations.transformers`: ``import quantcore.integrations.transformers`` makes
  every installed quantcore backend usable in transformers' ``from_pretrained`` and
  ``save_pretrained``.
- PEFT needs no module here: quantized linear layers that subclass
  :class:`quantcore.layers.QuantizedLinear` are ``nn.Linear`` layers to PEFT, which wraps them
  with its own LoRA ``Linear`` (see ``docs/integrations.md``).
"""
