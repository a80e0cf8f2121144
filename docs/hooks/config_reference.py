"""mkdocs hook: replace ``{{ config_reference }}`` with tables generated from the config classes.

The reference is derived from the fields themselves (types, defaults, choices, help), never
written by hand; every backend the registry knows gets a section.
"""

from __future__ import annotations

MARKER = "{{ config_reference }}"


def render() -> str:
    import quantcore
    from quantcore.schema import config_markdown

    sections = []
    for info in sorted(quantcore.available_backends(), key=lambda b: b.quant_method):
        if info.backend is None:
            continue
        sections.append(config_markdown(info.backend.config_class))
        where = f"`{info.distribution}` {info.version}" if info.distribution else f"plugin `{info.plugin}`"
        sections.append(f"Provided by {where}. JSON Schema: `{info.backend.config_class.__name__}.json_schema()`.\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
