"""Routing among experts (MoErging): the stacked-expert layer, selection policies, routers registry.

model = moerge.route.load_routed("smollm2-135m-instruct", "routers/arrow")
with routing_context(task_ids=["chain_sum"]):   # only the oracle (and task granularity) needs it
    model.generate(...)
"""

from moerge.route.folder import build_router, load_routed, prepare_router, read_router_config
from moerge.route.policies import Policy
from moerge.route.router import ROUTERS, Router, register_router, router_names
from moerge.route.routing import Routing
from moerge.route.stacked import (
    SparseRouting,
    StackedLoRALinear,
    StackedModel,
    attach_experts,
    routing_context,
)

__all__ = [
    "ROUTERS",
    "Policy",
    "Router",
    "Routing",
    "SparseRouting",
    "StackedLoRALinear",
    "StackedModel",
    "attach_experts",
    "build_router",
    "load_routed",
    "prepare_router",
    "read_router_config",
    "register_router",
    "router_names",
    "routing_context",
]
