"""The optimizer of TRAINING.md: SGD with Nesterov momentum, weight decay on weights only, per-unit gradient
scaling and adaptive gradient clipping relative to the parameter's norm.

Per parameter, in this order (`TwinSgd.step`):

1. `g = grad * scale` (`scale` = U, the number of units, for the readout's per-unit tensors: the objective is a
   mean over units; 1 otherwise);
2. adaptive clipping (`clip_gradient`): each slice of `g` is rescaled to norm at most
   `clip * max(|p_slice|, clip_eps)`. Slices are the rows (index 0: an output channel or a unit) of weights and
   of per-unit tensors, the whole tensor for every other parameter (gains, biases, monitor, retina pixel). The
   public text marks the exact per-slice rule as unverified; this is the unit-wise rule of adaptive gradient
   clipping (Brock et al. 2021) with the public names;
3. `g += weight_decay * p` for weights only (`weights.*` tensors: not `mu`, `sigma`, gains or biases);
4. momentum `b = momentum * b + g` (`b = g` on the first step), Nesterov `g = g + momentum * b`;
5. `p -= lr * g` (`lr * lr_scale`: a group's `lr_scale` is `OptimizerConfig.position_lr` for the readout
   positions, 1 otherwise).

Two options beyond the public recipe, off by default (`OptimizerConfig`): `readout_clip`, the clip of the
readout's per-unit tensors alone, and `position_lr`, the learning-rate scale of `mu` and `sigma`.

A parameter without a gradient (a stream that did not run this step) is skipped entirely: no decay, no momentum
update (as `torch.optim.SGD`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from fnn_model.training.config import OptimizerConfig
from fnn_model.training.twin import Twin


@dataclass(frozen=True)
class ParameterRole:
    """How the optimizer treats one tensor: gradient `scale`, weight `decay` or not, clipping by `rows` (slices
    along dim 0) or as a whole; `position`: a readout position tensor (`mu`, `sigma`)."""

    scale: float
    decay: bool
    rows: bool
    position: bool = False


def parameter_role(name: str, units: int) -> ParameterRole:
    """The role of a trained tensor from its state-dict key (`readout.*` per unit, `*.weights.*` decayed,
    `readout.position.*` positions)."""
    per_unit = name.startswith("readout.")
    weight = ".weights." in name
    return ParameterRole(scale=float(units) if per_unit else 1.0, decay=weight, rows=weight or per_unit,
                         position=name.startswith("readout.position."))


def clip_gradient(grad: torch.Tensor, param: torch.Tensor, clip: float, eps: float, rows: bool) -> torch.Tensor:
    """Adaptive clipping: every slice of `grad` (rows along dim 0 when `rows` and the tensor has more than one
    dim, else the whole tensor) whose norm exceeds `clip * max(|param slice|, eps)` is scaled down to that norm."""
    dims = tuple(range(1, grad.dim())) if rows and grad.dim() > 1 else tuple(range(grad.dim()))
    limit = clip * torch.linalg.vector_norm(param, dim=dims, keepdim=True).clamp(min=eps)
    norm = torch.linalg.vector_norm(grad, dim=dims, keepdim=True)
    return torch.where(norm > limit, grad * (limit / norm.clamp(min=torch.finfo(norm.dtype).tiny)), grad)


class TwinSgd(torch.optim.Optimizer):
    """SGD (Nesterov) with per-group `scale`, `decay` and `rows` (see the module docstring for the update).

    Param groups carry `lr`, `lr_scale`, `momentum`, `nesterov`, `weight_decay`, `clip`, `clip_eps`, `scale`,
    `decay`, `rows` and `names` (the tensors' state-dict keys); `state_dict()` / `load_state_dict()` are torch's.
    """

    def __init__(self, groups: Iterable[dict], config: OptimizerConfig = OptimizerConfig()) -> None:
        defaults = {**asdict(config), "lr_scale": 1.0, "scale": 1.0, "decay": True, "rows": False, "names": []}
        for option in ("readout_clip", "position_lr"):  # build_optimizer turns them into groups' clip / lr_scale
            defaults.pop(option)
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = clip_gradient(p.grad * group["scale"], p, group["clip"], group["clip_eps"], group["rows"])
                if group["decay"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if momentum:
                    state = self.state[p]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = g.clone()
                    else:
                        buffer.mul_(momentum).add_(g)
                    g = g.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.add_(g, alpha=-group["lr"] * group["lr_scale"])
        return loss


def build_optimizer(twin: Twin, config: OptimizerConfig = OptimizerConfig()) -> TwinSgd:
    """A `TwinSgd` over the twin's trained tensors, one param group per role (`parameter_role`): the readout's
    groups clip at `config.readout_clip` when it is set, the positions' learning rate is scaled by
    `config.position_lr`."""
    groups: dict[ParameterRole, dict] = {}
    for name, p in twin.named_trainable_parameters():
        role = parameter_role(name, twin.units)
        options = {"lr_scale": config.position_lr if role.position else 1.0}
        if name.startswith("readout.") and config.readout_clip is not None:
            options["clip"] = config.readout_clip
        group = groups.setdefault(role, {"params": [], "names": [], **asdict(role), **options})
        group["params"].append(p)
        group["names"].append(name)
    return TwinSgd(groups.values(), config)
