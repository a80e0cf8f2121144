"""Choosing which modules to quantize, and replacing them all or none.

Policies are data: an ordered list of rules (defaults, skip lists, overrides, the main config),
each a name predicate and a quantizer (``None`` keeps the module in float). A module takes the
first rule that matches its name or any of its ancestors' names.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from torch import nn

from .dispatch import AutoQuantizer
from .errors import ConfigError, QuantizationError
from .match import compile_pattern, exact_name
from .plugins import call_observers
from .quantizer_base import QuantizerBase, leaf_size, tensor_nbytes
from .report import ModuleRecord, QuantizationReport
from .state import STATE_ATTRIBUTE, QuantizationState, get_quantization_state
from .swap import swap_module

__all__ = ["ModelIndex", "Rule", "Walk", "default_float_modules", "paused_gc", "record_state", "report_decisions"]


@attrs.frozen
class Rule:
    """``label`` explains the decision in reports; ``quantizer`` is ``None`` for "keep in float"."""

    label: str
    matches: Callable[[str], bool] = attrs.field(repr=False)
    quantizer: QuantizerBase | None
    source: str | None = None  # "config" or the override pattern: what QuantizationState records


@attrs.frozen
class Decision:
    """The rule chosen for one candidate module, and where the module sits."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    child: str
    rule: Rule | None  # None: no rule applies (no main config and no matching override)


@attrs.define
class ModelIndex:
    """One pass over a model: every module with its parent, who uses each parameter, and the totals."""

    entries: list[tuple[str, nn.Module, nn.Module | None, str, int]]  # name, module, parent, child, parent pos
    tied: dict[int, list[str]]  # id(parameter) -> every "module.param" name, for parameters used twice or more
    params: int
    nbytes: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelIndex:
        """Index ``model`` (pre-order, like ``named_modules``; shared modules once)."""
        entries: list[tuple[str, nn.Module, nn.Module | None, str, int]] = []
        first_user: dict[int, tuple[int, str]] = {}  # id(tensor) -> (entry position, name in module)
        tied: dict[int, list[str]] = {}
        seen_modules: set[int] = set()
        params = nbytes = 0
        stack: list[tuple[str, nn.Module, nn.Module | None, str, int]] = [("", model, None, "", -1)]
        while stack:
            entry = stack.pop()
            module = entry[1]
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            pos = len(entries)
            entries.append(entry)
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                key = id(p)
                if key in first_user:  # tied: spell out names only for these few
                    if key not in tied:
                        at, first = first_user[key]
                        tied[key] = [_join(entries[at][0], first)]
                    tied[key].append(_join(entry[0], pname))
                    continue
                first_user[key] = (pos, pname)
                n = p.numel()
                params += n
                nbytes += n * p.element_size()
            for b in module._buffers.values():
                if b is not None and id(b) not in first_user:
                    first_user[id(b)] = (pos, "")
                    nbytes += b.numel() * b.element_size()
            if module._modules:
                prefix = f"{entry[0]}." if entry[0] else ""
                stack.extend(
                    reversed(
                        [(prefix + c, sub, module, c, pos) for c, sub in module._modules.items() if sub is not None]
                    )
                )
        return cls(entries, tied, params, nbytes)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# Containers whose forward reads a child linear's ``.weight`` itself (fused fast paths), so a
# replaced child breaks them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def default_float_modules(model: nn.Module, index: ModelIndex | None = None) -> dict[str, str]:
    """Modules kept in float by default: the output head and linears whose weight is tied elsewhere.

    Returns ``{module name: reason}``.
    """
    index = index or ModelIndex.of(model)
    out: dict[str, str] = {}
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        try:
            head = get_head()
        except Exception:  # some architectures raise NotImplementedError
            head = None
    for name, module, parent, *_ in index.entries:
        if head is not None and module is head:
            out.setdefault(name, "default: output head")
        if parent is not None and isinstance(parent, _READS_CHILD_WEIGHTS) and isinstance(module, nn.Linear):
            out.setdefault(name, f"default: {type(parent).__name__} reads its weight directly")
        if isinstance(module, nn.Linear):
            weight = module._parameters.get("weight")
            users = index.tied.get(id(weight), ()) if weight is not None else ()
            if users:
                others = [u for u in users if u != f"{name}.weight"]
                out.setdefault(name, f"default: weight tied to {others[0]}")
    return out


def _as_quantizer(value: Any, cache: dict[int, QuantizerBase]) -> QuantizerBase | None:
    if value is None:
        return None
    if isinstance(value, QuantizerBase):
        return value
    key = id(value)
    if key not in cache:
        cache[key] = AutoQuantizer.from_config(value)
    return cache[key]


def _rules(
    main: QuantizerBase | None,
    model: nn.Module,
    index: ModelIndex,
    overrides: Mapping[str, Any] | None,
    skip_modules: list[str] | None,
    default_skips: bool,
) -> tuple[list[Rule], dict[str, int]]:
    """Ordered rules (default skips, skip patterns, overrides, the config) and the exact-name ones' positions.

    Every bad pattern or override is reported at once, before anything runs.
    """
    rules: list[Rule] = []
    problems: list[tuple[str, str]] = []
    exact: dict[str, int] = {}
    if default_skips:
        for name, reason in default_float_modules(model, index).items():
            exact[name] = len(rules)
            rules.append(Rule(reason, exact_name(name), None))
    skip_sources: list[tuple[str, str]] = []
    if main is not None:
        field = main.config.skip_modules_field or "skip_modules"
        skip_sources += [(p, field) for p in main.config.skip_modules()]
    skip_sources += [(p, "skip_modules") for p in (skip_modules or [])]
    for pattern, source in skip_sources:
        try:
            rules.append(Rule(f"skip: {pattern!r} ({source})", compile_pattern(pattern), None))
        except ValueError as exc:
            problems.append((source, str(exc)))
    cache: dict[int, QuantizerBase] = {}
    implied = main.config.module_overrides() if main is not None else {}
    given = dict(overrides or {})
    for pattern, value in [*given.items(), *((p, v) for p, v in implied.items() if p not in given)]:
        try:
            matcher = compile_pattern(pattern)
            quantizer = _as_quantizer(value, cache)
        except ValueError as exc:  # ConfigError is a ValueError: keep its text
            problems.append((f"overrides[{pattern!r}]", str(exc)))
            continue
        label = f"override: {pattern!r}" + (" -> keep in float" if quantizer is None else "")
        rules.append(Rule(label, matcher, quantizer, source=pattern))
    if problems:
        raise ConfigError(problems, title="invalid quantize arguments")
    if main is not None:
        rules.append(Rule("config", lambda n: True, main, source="config"))
    return rules, exact


@attrs.define
class Walk:
    """One planned pass over a model: the rules, then the decisions they give."""

    model: nn.Module
    rules: list[Rule]
    quantizers: list[QuantizerBase]
    main: QuantizerBase | None
    overrides: dict[str, Any] = attrs.Factory(dict)
    skip_modules: list[str] = attrs.Factory(list)
    default_skips: bool = True
    index: ModelIndex | None = None
    exact: dict[str, int] = attrs.Factory(dict)  # default rules by exact module name -> rule position

    @classmethod
    def build(
        cls,
        main: QuantizerBase | None,
        model: nn.Module,
        overrides: Mapping[str, Any] | None = None,
        skip_modules: list[str] | None = None,
        default_skips: bool = True,
    ) -> Walk:
        """Turn the call's arguments into ordered rules (bad patterns raise before anything runs)."""
        index = ModelIndex.of(model)
        rules, exact = _rules(main, model, index, overrides, skip_modules, default_skips)
        quantizers = [r.quantizer for r in rules if r.quantizer is not None]
        unique = list({id(q): q for q in quantizers}.values())
        overrides_used = {
            r.source: (r.quantizer.config if r.quantizer else None) for r in rules if r.source not in (None, "config")
        }
        return cls(model, rules, unique, main, overrides_used, list(skip_modules or []), default_skips, index, exact)

    def keep_in_float(self, labels: Mapping[str, str]) -> Walk:
        """A copy of this walk whose first rules keep the named modules in float, under their labels."""
        rules = [Rule(label, exact_name(name), None) for name, label in labels.items()]
        exact = {name: i + len(rules) for name, i in self.exact.items()}
        exact.update({name: i for i, name in enumerate(labels)})
        return attrs.evolve(self, rules=rules + self.rules, exact=exact)

    # ------------------------------------------------------------------ deciding
    def decide(self) -> list[Decision]:
        """Every candidate module with its rule, in module order."""
        replaceable = tuple({t for q in self.quantizers for t in q.replaces})
        if not replaceable:
            return []
        index = self.index or ModelIndex.of(self.model)
        none = len(self.rules)
        patterned = [(i, r.matches) for i, r in enumerate(self.rules) if r.label and i not in self.exact.values()]
        effective: list[int] = []
        inside: list[bool] = []  # under a candidate already: not a candidate itself
        decisions: list[Decision] = []
        for name, module, parent, child, parent_pos in index.entries:
            inherited = effective[parent_pos] if parent_pos >= 0 else none
            here = self.exact.get(name, none)
            if name:
                for i, matches in patterned:
                    if i >= here or i >= inherited:
                        break
                    if matches(name):
                        here = i
                        break
            rule_index = min(here, inherited)
            effective.append(rule_index)
            under = parent_pos >= 0 and inside[parent_pos]
            candidate = not under and isinstance(module, replaceable) and not self._already_quantized(module)
            inside.append(under or candidate)
            if candidate:
                rule = self.rules[rule_index] if rule_index < none else None
                decisions.append(Decision(name, module, parent, child, rule))
        return decisions

    def _already_quantized(self, module: nn.Module) -> bool:
        return any(q.is_quantized_module(module) for q in self.quantizers)

    # ------------------------------------------------------------------ reporting
    def size(self) -> tuple[int, int]:
        """``(parameters, bytes)`` of the whole model, as the walk found it."""
        index = self.index or ModelIndex.of(self.model)
        return index.params, index.nbytes

    def plan(self) -> QuantizationReport:
        """The dry run: a report of what :meth:`run` would do."""
        start = time.perf_counter()
        decisions = self.decide()
        return report_decisions(self, decisions, dry_run=True, seconds=time.perf_counter() - start)

    # ------------------------------------------------------------------ replacing
    def run(self, progress: bool | None = None) -> QuantizationReport:
        """Replace every chosen module, or none: replacements are built first, then swapped in."""
        start = time.perf_counter()
        for q in self.quantizers:
            q.check_environment()
        decisions = self.decide()
        size = self.size()
        plan = report_decisions(self, decisions, dry_run=True, size=size)
        config = self.main.config if self.main is not None else None
        call_observers("before_quantize", model=self.model, config=config, plan=plan)
        chosen = [
            (d, d.rule.quantizer)
            for d in decisions
            if d.rule is not None and d.rule.quantizer is not None and d.rule.quantizer.can_replace(d.module)
        ]
        built: list[tuple[Decision, nn.Module]] = []
        bar = _progress(len(chosen), progress)
        try:
            for d, quantizer in chosen:
                try:
                    built.append((d, quantizer.create_quantized_module(d.module, d.name)))
                except Exception as exc:
                    raise QuantizationError(
                        f"could not quantize module {d.name!r} ({type(d.module).__name__}) with "
                        f"{quantizer.describe()}: {type(exc).__name__}: {exc}; the model was left unchanged"
                    ) from exc
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        if any(d.parent is None for d, _ in built):
            raise QuantizationError("the model itself is a single module: quantize a container instead")
        # Swapping is a mode flag and a dict assignment: nothing here can fail half-way.
        for d, new in built:
            assert d.parent is not None
            swap_module(d.parent, d.child, new)
        record_state(self, built)
        # The plan's records describe exactly what was built: reuse them instead of measuring twice.
        report = attrs.evolve(plan, dry_run=False, seconds=time.perf_counter() - start)
        call_observers("after_quantize", model=self.model, config=config, report=report)
        return report


def report_decisions(
    walk: Walk,
    decisions: list[Decision],
    *,
    dry_run: bool,
    seconds: float = 0.0,
    size: tuple[int, int] | None = None,
) -> QuantizationReport:
    """The report of ``decisions``: per module what its rule does (or why not), and the bytes."""
    records = []
    saved = 0
    labels: dict[int, str] = {}
    for d in decisions:
        module = d.module
        params, before = leaf_size(module)
        quantizer = d.rule.quantizer if d.rule is not None else None
        if quantizer is not None and not quantizer.can_replace(module):
            reason = f"{d.rule.label if d.rule else 'config'}: {quantizer.unsupported_reason(module)}"
            quantizer = None
        else:
            reason = d.rule.label if d.rule is not None else "no rule matched"
        method = None
        after = before
        if quantizer is not None:
            after = quantizer.quantized_nbytes(module)
            method = labels.get(id(quantizer))
            if method is None:
                method = labels[id(quantizer)] = quantizer.describe()
        saved += before - after
        records.append(
            ModuleRecord(
                name=d.name,
                module_type=type(module).__name__,
                action="quantized" if quantizer is not None else "skipped",
                rule=reason,
                method=method,
                params=params,
                bytes_before=before,
                bytes_after=after,
            )
        )
    params, total = size or walk.size()
    replaced = {r.name for r in records if r.action == "quantized"}
    kept = _kept_tied_bytes(walk, replaced) if replaced else 0
    return QuantizationReport(records, params, total, total - saved + kept, dry_run=dry_run, seconds=seconds)


def _kept_tied_bytes(walk: Walk, replaced: set[str]) -> int:
    """Bytes that the ``replaced`` modules' records count as freed but that stay in the model:
    a parameter tied to a module that is not replaced (a quantized output head whose weight is
    the input embeddings'), and a tied parameter's second count where several users are replaced."""
    index = walk.index or ModelIndex.of(walk.model)
    kept = 0
    for users in index.tied.values():
        owners = {name.rpartition(".")[0] for name in users}
        hits = len(owners & replaced)
        if hits:
            nbytes = tensor_nbytes(walk.model.get_parameter(users[0]))
            kept += nbytes * hits - (nbytes if owners <= replaced else 0)
    return kept


def record_state(walk: Walk, built: list[tuple[Decision, nn.Module]]) -> None:
    """Keep on the model what was done, merged with earlier calls (for saving and loading)."""
    state = get_quantization_state(walk.model)
    if state is None:
        state = QuantizationState(walk.main.config if walk.main else None, {}, walk.skip_modules, walk.default_skips)
        walk.model.__dict__[STATE_ATTRIBUTE] = state
    elif state.config is None and walk.main is not None:
        state.config = walk.main.config
    for d, _ in built:
        assert d.rule is not None and d.rule.source is not None
        source = d.rule.source
        if source == "config" and state.config is not (walk.main.config if walk.main else None):
            # a second call with another main config: record it as an exact-name override
            source = d.name
            state.overrides[source] = walk.main.config if walk.main else None
        elif source != "config":
            state.overrides[source] = walk.overrides[source]
        state.modules[d.name] = source


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a walk allocates thousands of modules.

    Each new module brings a dozen containers; on a large model that sets off repeated full
    collections, which cost more than the walk itself. Reference counting still frees memory.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = total >= 200 and sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="quantizing", unit="module", leave=False)
