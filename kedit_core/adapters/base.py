"""Model adapters: the one place where kedit knows how a model family is laid out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import AdapterNotFoundError, KeditError


@dataclass(frozen=True)
class ModelAdapter:
    """Where a model family keeps the parts that editing needs.

    Module paths are dotted names relative to the ``*ForCausalLM`` model; ``{}`` stands for the layer
    index; ``a|b`` lists alternatives across transformers versions (the first that exists is used).
    Matched on the model config's class name (``config_classes``; base classes count too).
    """

    name: str
    config_classes: tuple[str, ...]
    layers: str                      # the ModuleList of transformer blocks, e.g. "transformer.h"
    mlp: str                         # the block's MLP, e.g. "transformer.h.{}.mlp"
    mlp_out: str                     # the MLP output projection (the edited matrix), "...mlp.c_proj"
    attn: str                        # the block's attention module
    final_norm: str                  # e.g. "transformer.ln_f"
    unembedding: str                 # e.g. "lm_head"
    embedding: str                   # the token embedding, e.g. "transformer.wte"
    # How mlp_out's weight is stored: "out_in" for nn.Linear ([d_model, d_ff]); "in_out" for GPT-2's
    # Conv1D ([d_ff, d_model]).
    mlp_out_layout: Literal["out_in", "in_out"] = "out_in"
    context_length_keys: tuple[str, ...] = ("max_position_embeddings", "n_positions", "n_ctx")
    # A norm applied to the MLP's output before it joins the residual stream (Gemma 2/3's
    # post_feedforward_layernorm): residual-space targets must be mapped through it (see
    # BoundAdapter.mlp_output_change). None: the MLP output is added to the residual as it is.
    post_mlp_norm: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def bind(self, model: nn.Module) -> "BoundAdapter":
        return BoundAdapter(self, model)


class BoundAdapter:
    """A :class:`ModelAdapter` applied to one model instance: layer count, sizes, modules, weights."""

    def __init__(self, adapter: ModelAdapter, model: nn.Module):
        self.spec = adapter
        self.model = model
        self._modules = dict(model.named_modules())
        layers = self._modules.get(adapter.layers)
        if layers is None or not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise KeditError(f"adapter '{adapter.name}': model {type(model).__name__} has no block list at "
                             f"'{adapter.layers}'")
        self.num_layers = len(layers)
        self._paths = {}
        for field_name in ("mlp", "mlp_out", "attn", "final_norm", "unembedding", "embedding", "post_mlp_norm"):
            if getattr(adapter, field_name) is None:
                continue
            options = getattr(adapter, field_name).split("|")
            found = next((o for o in options if o.format(0) in self._modules), None)
            if found is None:
                raise KeditError(f"adapter '{adapter.name}': model {type(model).__name__} has no module "
                                 f"{' or '.join(repr(o.format(0)) for o in options)} ({field_name})")
            self._paths[field_name] = found
        weight = self.mlp_out_weight(0)
        if weight.dim() != 2:
            raise KeditError(f"adapter '{adapter.name}': {self.mlp_out_name(0)}.weight is not a matrix")
        if adapter.mlp_out_layout == "out_in":
            self.hidden_size, self.key_size = weight.shape
        else:
            self.key_size, self.hidden_size = weight.shape
        config_hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
        if config_hidden is not None and config_hidden != self.hidden_size:
            raise KeditError(f"adapter '{adapter.name}': {self.mlp_out_name(0)}.weight has shape "
                             f"{tuple(weight.shape)}, which does not fit layout {adapter.mlp_out_layout!r} "
                             f"with hidden size {config_hidden}")

    # -- names -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise KeditError(f"layer {layer!r} is out of range: the model has layers 0..{self.num_layers - 1}")
        return layer

    def layer_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{self._check_layer(layer)}"

    def mlp_name(self, layer: int) -> str:
        return self._paths['mlp'].format(self._check_layer(layer))

    def mlp_out_name(self, layer: int) -> str:
        return self._paths['mlp_out'].format(self._check_layer(layer))

    def attn_name(self, layer: int) -> str:
        return self._paths['attn'].format(self._check_layer(layer))

    def post_mlp_norm_name(self, layer: int) -> str | None:
        """The norm between the MLP's output and the residual stream at ``layer``, if the family has one."""
        path = self._paths.get("post_mlp_norm")
        return None if path is None else path.format(self._check_layer(layer))

    def mlp_out_weight_name(self, layer: int) -> str:
        return self.mlp_out_name(layer) + ".weight"

    # -- modules and weights -------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        try:
            return self._modules[name]
        except KeyError:
            raise KeditError(f"model {type(self.model).__name__} has no module '{name}'") from None

    def mlp_out_weight(self, layer: int) -> nn.Parameter:
        return self.module(self.mlp_out_name(layer)).weight

    @property
    def final_norm_name(self) -> str:
        return self._paths["final_norm"]

    @property
    def unembedding_name(self) -> str:
        return self._paths["unembedding"]

    @property
    def embedding_name(self) -> str:
        return self._paths["embedding"]

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self._paths['final_norm'])

    @property
    def unembedding(self) -> nn.Module:
        return self.module(self._paths['unembedding'])

    @property
    def embedding(self) -> nn.Module:
        return self.module(self._paths['embedding'])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from a block's output ``[..., d]``: final norm, unembedding (with its bias),
        and the family's final logit soft-capping when the config sets one (Gemma 2)."""
        logits = self.unembedding(self.final_norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def mlp_output_change(self, layer: int, mlp_output: torch.Tensor, residual_change: torch.Tensor) -> torch.Tensor:
        """The change of the MLP's output ``[N, d]`` that moves the residual stream by ``residual_change``
        (as nearly as the family's post-MLP norm allows).

        Without a post-MLP norm the two are the same. With an RMS norm ``y = g ⊙ m / rms(m)`` after the
        MLP (Gemma 2/3) the norm's outputs are the ellipsoid ``{c·g ⊙ u : mean(u²) = 1}`` (``c`` the eps
        factor at ``m``'s own rms): the wanted ``y = N(m) + r`` is replaced by its **nearest** point there,
        ``u = c·g ⊙ y / (c²g² + μ)`` with the scalar ``μ`` that puts ``u`` on the sphere (found by bisection),
        and ``m* = rms(m)·u``, which the norm maps exactly onto that point; a reachable ``y`` is hit exactly.
        (Dividing ``y`` by the gain and rescaling instead lets the channels of tiny gain — Gemma-3-270m's
        gains span 1e-3 … 800 within one layer — take all of ``u``'s rms, and the change then points
        nowhere near ``r``.) Channels whose gain is exactly zero (quantised Gemma-3-270m has some:
        ``1 + w == 0``) output 0 whatever ``m`` is: they keep ``m``'s own value. Returns ``m* − m``.
        """
        name = self.post_mlp_norm_name(layer)
        if name is None:
            return residual_change
        norm = self.module(name)
        m = mlp_output.to(torch.float64)
        r = residual_change.to(torch.float64)
        with torch.no_grad():
            ones = torch.ones(1, m.shape[-1], dtype=norm.weight.dtype, device=norm.weight.device)
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
            gain = (norm(ones).to(torch.float64) * (1.0 + eps) ** 0.5).reshape(-1).to(m.device)
            y = norm(mlp_output.to(norm.weight.dtype)).to(torch.float64).to(m.device) + r.to(m.device)
        return (rms_norm_preimage(m, y, gain, eps) - m).to(residual_change.dtype)

    @property
    def context_length(self) -> int:
        for key in self.spec.context_length_keys:
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise KeditError(f"adapter '{self.name}': the config has none of {self.spec.context_length_keys}")

    # -- layouts -------------------------------------------------------------------------------
    def to_param_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """A ``[d_model, d_ff]`` update (the math's ``W`` layout) in ``mlp_out``'s stored layout."""
        return delta_out_in if self.spec.mlp_out_layout == "out_in" else delta_out_in.T.contiguous()

    def from_param_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """``mlp_out``'s stored weight as ``[d_model, d_ff]``."""
        return weight if self.spec.mlp_out_layout == "out_in" else weight.T


def rms_norm_preimage(m: torch.Tensor, y: torch.Tensor, gain: torch.Tensor, eps: float = 0.0, *,
                      iterations: int = 200) -> torch.Tensor:
    """``m*`` with ``rms(m*) = rms(m)`` whose RMS norm ``g ⊙ m* / sqrt(mean(m*²) + eps)`` is the point of that
    norm's outputs nearest to ``y`` (rows ``[N, d]``, float64; ``gain`` ``[d]``). Channels of gain exactly 0
    keep ``m``'s value. See :meth:`BoundAdapter.mlp_output_change`."""
    d = m.shape[-1]
    s = m.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)                 # rms(m)     [N, 1]
    u0 = m / s
    c = s / (s.pow(2) + eps).sqrt()                                               # N(s·u) = c·g ⊙ u
    live = gain != 0
    cg = c * torch.where(live, gain, torch.zeros_like(gain))                      # [N, d]
    num = cg * y                                                                  # u = num / (cg² + μ)
    # The live channels share what rms the dead ones leave: Σ_live u² = budget.
    budget = (d - torch.where(live, torch.zeros_like(u0), u0).pow(2).sum(-1, keepdim=True)).clamp_min(1e-12)
    # Σ (num / (cg² + μ))² falls from +∞ to 0 as μ rises from −min cg² (over channels with num ≠ 0); with
    # t = μ + min cg², it is at most Σ num² / t², so the root lies in (0, sqrt(Σ num² / budget)].
    active = num != 0
    floor = torch.where(active, cg.pow(2), torch.full_like(cg, float("inf"))).amin(-1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    hi = (num.pow(2).sum(-1, keepdim=True) / budget).sqrt().clamp_min(1e-300).log()
    lo = hi - 80.0
    for _ in range(iterations):                                                   # bisection on log t
        mid = 0.5 * (lo + hi)
        den = cg.pow(2) - floor + mid.exp()
        over = torch.where(active, num / den, torch.zeros_like(num)).pow(2).sum(-1, keepdim=True) > budget
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    den = cg.pow(2) - floor + (0.5 * (lo + hi)).exp()
    u = torch.where(active, num / den, torch.zeros_like(num))
    u = torch.where(live, u, u0)
    return s * u


def resolve_adapter(model_or_config) -> ModelAdapter:
    """The registered adapter for a model (or its config), matched on the config's class name and
    its base classes. Raises :class:`AdapterNotFoundError` naming the class if none is registered."""
    from ..plugins import get_registry

    config = getattr(model_or_config, "config", model_or_config)
    adapters = get_registry().adapters
    for cls in type(config).__mro__:
        reg = adapters.get(cls.__name__)
        if reg is not None:
            return reg.obj
    known = ", ".join(sorted(adapters))
    raise AdapterNotFoundError(
        f"no kedit model adapter for config class '{type(config).__name__}' "
        f"(model_type '{getattr(config, 'model_type', '?')}'). Adapters are registered for: {known}. "
        "To support this architecture, register a kedit_core.adapters.ModelAdapter from a plugin's "
        "register_model_adapters hook (see 'Writing a plugin' in the README).")


def bind_adapter(model: nn.Module) -> BoundAdapter:
    return resolve_adapter(model).bind(model)
