"""Model conversion: swap ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` for their quantized versions in place
(like torchao's ``quantize_(model, config)``) and back."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from coset.lattice.validate import check_bool

from .config import QATConfig
from .layer import QuantLayerMixin
from .qconv import QConv1d, QConv2d
from .qlinear import QLinear

__all__ = [
    "quantize_model",
    "dequantize_model",
    "set_quantization_enabled",
    "quantized_layers",
    "LayerReport",
    "ConversionReport",
    "module_names",
]

_SWAP: dict[type[nn.Module], type[QLinear] | type[QConv1d] | type[QConv2d]] = {
    nn.Linear: QLinear,
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
}
_KIND = {QLinear: "linear", QConv1d: "conv1d", QConv2d: "conv2d"}

Selector = None | str | Iterable[str] | Callable[[str, nn.Module], bool]
ConfigSpec = QATConfig | Mapping[str, QATConfig | None]


@dataclass(frozen=True)
class LayerReport:
    """One swapped layer: name, kind ("linear"/"conv1d"/"conv2d"), weight shape, config, nominal bits/weight,
    padding, and ``aliases``: the other names under which the same module object is used (all converted)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    config: QATConfig
    bits_per_weight: float
    pad: int
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`quantize_model` swapped (``layers``) and left alone (``skipped``: name -> reason)."""

    layers: tuple[LayerReport, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.layers]

    @property
    def num_weights(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Weighted mean of the layers' nominal bits/weight (nan when nothing was swapped)."""
        n = self.num_weights
        return sum(r.bits_per_weight * r.numel for r in self.layers) / n if n else float("nan")

    def __str__(self) -> str:
        lines = [f"{'layer':<32} {'kind':<7} {'weight shape':<22} {'bits/w':>7}  pad"]
        for r in self.layers:
            also = f"  (shared: also {', '.join(r.aliases)})" if r.aliases else ""
            lines.append(f"{r.name:<32} {r.kind:<7} {str(r.weight_shape):<22} {r.bits_per_weight:7.3f}  {r.pad}{also}")
        lines.append(f"{len(self.layers)} layers, {self.num_weights} weights, {self.bits_per_weight:.3f} bits/weight")
        return "\n".join(lines)


def _matcher(sel: Selector, argname: str) -> Callable[[str, nn.Module], bool] | None:
    if sel is None:
        return None
    if callable(sel):
        return sel
    if isinstance(sel, str):
        pats = [sel]
    else:
        try:
            pats = list(sel)
        except TypeError:
            raise TypeError(f"{argname} must be None, a pattern, a list of patterns or a callable") from None
        if not all(isinstance(p, str) for p in pats):
            raise TypeError(f"{argname} patterns must be str")
    return lambda name, mod: any(fnmatch.fnmatchcase(name, p) for p in pats)


def _config_for(name: str, config: ConfigSpec) -> tuple[bool, QATConfig | None]:
    if isinstance(config, QATConfig):
        return True, config
    for pat, cfg in config.items():
        if fnmatch.fnmatchcase(name, pat):
            return True, cfg
    return False, None


def quantize_model(
    model: nn.Module,
    config: ConfigSpec | None = None,
    include: Selector = None,
    exclude: Selector = None,
) -> ConversionReport:
    """Swap the model's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` for QLinear / QConv1d / QConv2d in place.

    Parameters
    ----------
    model : nn.Module (modified in place; the new layers share the old weight/bias Parameters, so an
        optimizer built before the swap keeps training them)
    config : QATConfig or dict {fnmatch pattern on the module name: QATConfig or None}
        A dict gives per-layer configs: the first matching pattern (in insertion order) wins; ``None``
        leaves the layer in float; names matching no pattern are skipped. Default ``QATConfig()``.
    include, exclude : None, a pattern, a list of patterns (fnmatch on qualified module names such as
        ``"features.0"``) or a callable ``(name, module) -> bool``. A layer is swapped when it matches
        ``include`` (everything when None) and not ``exclude``.

    Returns
    -------
    ConversionReport with one LayerReport per swapped layer (name, kind, weight shape, config, bits/weight,
    and the other names of a module object used at several places: every use is swapped for the same
    quantized layer, so weight tying survives).

    Raises
    ------
    TypeError for a model that is not an ``nn.Module`` or a config/selector of the wrong type; ValueError when
    one module object used under several names would be treated differently at its uses (different configs,
    or included at one and excluded at another): converting only some uses would leave the model half float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QATConfig()
    if not isinstance(config, (QATConfig, Mapping)):
        raise TypeError(f"config must be a QATConfig or a dict of them, got {type(config).__name__}")
    if isinstance(config, Mapping):
        for pat, cfg in config.items():
            if not isinstance(pat, str):
                raise TypeError(f"config keys must be fnmatch patterns (str), got {pat!r}")
            if cfg is not None and not isinstance(cfg, QATConfig):
                raise TypeError(f"config[{pat!r}] must be a QATConfig or None, got {type(cfg).__name__}")
    inc = _matcher(include, "include")
    exc = _matcher(exclude, "exclude")
    layers: list[LayerReport] = []
    skipped: dict[str, str] = {}
    names = module_names(model)
    for name, mod in list(model.named_modules()):  # first name of each module object, before any swap
        if type(mod) not in _SWAP and not isinstance(mod, QuantLayerMixin):
            continue
        uses = names[id(mod)]
        if isinstance(mod, QuantLayerMixin):
            for n in uses:
                skipped[n] = "already quantized"
            continue
        # a module object used at several places is converted at all of them, or at none (never half)
        decisions = {n: _decide(n, mod, config, inc, exc) for n in uses}
        (first_cfg, first_reason) = decisions[name]
        for n, (cfg, reason) in decisions.items():
            if cfg != first_cfg:
                raise ValueError(
                    f"module object used as {name!r} and {n!r} gets different treatment ({first_reason or 'quantized'} "
                    f"vs {reason or 'quantized'}); a shared module must be quantized with one config at all its uses"
                )
        if first_cfg is None:
            for n in uses:
                skipped[n] = decisions[n][1]
            continue
        qmod = _SWAP[type(mod)].from_float(mod, first_cfg)
        qmod.set_name(name)
        for n in uses:
            _set_submodule(model, n, qmod)
        layers.append(
            LayerReport(
                name,
                _KIND[type(qmod)],
                tuple(qmod.weight.shape),
                first_cfg,
                qmod.bits_per_weight(),
                qmod.pad,
                tuple(uses[1:]),
            )
        )
    return ConversionReport(tuple(layers), skipped)


def _decide(name: str, mod: nn.Module, config: ConfigSpec, inc, exc) -> tuple[QATConfig | None, str]:
    """``(config, "")`` to quantize the module under ``name``, or ``(None, reason)`` to skip it."""
    if inc is not None and not inc(name, mod):
        return None, "not included"
    if exc is not None and exc(name, mod):
        return None, "excluded"
    matched, cfg = _config_for(name, config)
    if cfg is None:
        return None, "no config" if not matched else "config is None"
    return cfg, ""


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(module): [every qualified name it is used under]}`` in module order (shared modules appear once
    in ``named_modules()`` but may sit at several places)."""
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        lst = out.setdefault(id(mod), [])
        if name not in lst:
            lst.append(name)
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("the model itself is a Linear/Conv layer; wrap it in a container to convert it")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dequantize_model(model: nn.Module, use_quantized: bool = False) -> list[str]:
    """Swap every quantized layer back to its float class in place.

    Parameters
    ----------
    model : nn.Module
    use_quantized : False: the float layer gets the shadow weight (the Parameter itself, undoing
        :func:`quantize_model`); True: it gets a copy of the quantized weight (a plain float model that
        reproduces the weight-only quantized eval forward).

    Returns
    -------
    names of the swapped layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = []
    aliases = module_names(model)
    for _, mod in list(model.named_modules()):
        if isinstance(mod, QuantLayerMixin):
            flt = mod.to_float(use_quantized=use_quantized)
            for n in aliases[id(mod)]:  # one float module for every use of a shared layer
                _set_submodule(model, n, flt)
                names.append(n)
    return names


def quantized_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """``{name: layer}`` of the model's quantized layers, in module order (a shared layer once, under its first
    name). Raises ``TypeError`` for a model that is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def set_quantization_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn fake quantization on or off in every quantized layer (off: exact float forward). Returns the count."""
    check_bool("enabled", enabled)
    layers = quantized_layers(model)
    for m in layers.values():
        m.quant_enabled = enabled
    return len(layers)
