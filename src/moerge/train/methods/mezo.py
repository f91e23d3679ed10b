"""MeZO methods: which weights zeroth-order SGD moves (the loop itself is `moerge.train.zeroth`).

`mezo` moves every weight (full-parameter, as in the MeZO paper; the expert is a whole model folder);
`mezo_lora` moves only a LoRA adapter's weights (the expert is an adapter). They are two names rather
than one method with an option because a method's kind (adapter or full) is fixed per name: stage
chains and quantisation checks read it before any option is.
"""

from __future__ import annotations

from pydantic import Field

from moerge.train.methods.base import LoraOptions, NoOptions, register
from moerge.train.methods.builtin import FullMethod, PeftMethod, _lora


class MezoOptions(NoOptions):
    """Zeroth-order SGD: the gradient along a random direction z, from two forwards at θ ± eps·z."""

    eps: float = Field(1e-3, gt=0, description="perturbation scale of the two forwards")


class MezoLoraOptions(LoraOptions, MezoOptions):
    """MeZO on a LoRA adapter's weights."""


class ZerothOrder:
    """Marks a method trained by `moerge.train.zeroth` (forwards only, no gradients stored)."""


class MezoFull(ZerothOrder, FullMethod):
    name = "mezo"
    default_lr = 1e-6
    options = MezoOptions


class MezoLora(ZerothOrder, PeftMethod):
    def __init__(self) -> None:
        super().__init__("mezo_lora", _lora, default_lr=1e-4, options=MezoLoraOptions)


register(MezoFull())
register(MezoLora())
