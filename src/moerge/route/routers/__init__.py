"""The built-in routers, one file each; each registers itself with `@register_router("<name>")`
(`moerge.route.router` imports them all when a router is looked up by name)."""
