"""Routing among experts (MoErging): the stacked-expert layer, selection policies, routers registry.

model = moerge.route.load_routed("smollm2-135m-instruct", "routers/arrow")
with routing_context(task_ids=["chain_sum"]):   # only the oracle (and task granularity) needs it
    model.generate(...)
added, active = model.moerge_routing.routing.parameter_counts()

Each router's options are a pydantic model, `get_router(name).options_model`; `build_router(...,
options={...})` validates them and refuses options the router does not take.
"""

from moerge.route.folder import build_router, load_routed, prepare_router, read_router_config
from moerge.route.policies import SELECTORS, Policy, parse_policy, register_selector
from moerge.route.router import ROUTERS, OptionsModel, Router, get_router, register_router, router_names
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
    "SELECTORS",
    "OptionsModel",
    "Policy",
    "Router",
    "Routing",
    "SparseRouting",
    "StackedLoRALinear",
    "StackedModel",
    "attach_experts",
    "build_router",
    "get_router",
    "load_routed",
    "parse_policy",
    "prepare_router",
    "read_router_config",
    "register_router",
    "register_selector",
    "router_names",
    "routing_context",
]
