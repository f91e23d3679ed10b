"""The packaged demo recipe is what the README promises: ≥6 held-in, ≥3 held-out, the ten strategies."""

from moerge.recipes.demo import packaged_recipe


def test_packaged_demo_recipe(tmp_path):
    recipe = packaged_recipe(tmp_path)
    assert recipe.library == str(tmp_path.resolve() / "library")
    assert len(recipe.held_in) >= 6 and len(recipe.held_out) >= 3
    sources = {t.task.split(":")[0] for t in recipe.held_in}
    assert sources == {"gym", "bigbench"}
    names = [s.name for s in recipe.strategies]
    assert names == [
        "base",
        "oracle",
        "multitask",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "arrow",
        "phatgoose",
        "glider",
        "centroid",
    ]
    assert recipe.forgetting.probe and recipe.forgetting.task


def test_router_benchmark_recipe_runs_on_the_demo_experts(tmp_path):
    """benchmarks/routers.yaml must stay the demo's tasks and settings so it reuses the demo's experts
    and cached scores; only the strategies differ (every router of the routing issue)."""
    from pathlib import Path

    from moerge.recipes.compare import load_compare_config

    demo = packaged_recipe(tmp_path)
    routers = load_compare_config(Path(__file__).parents[2] / "benchmarks" / "routers.yaml")
    assert routers.library == str((Path(__file__).parents[2] / "runs" / "demo" / "library").resolve())
    for field in ("base", "method", "hyperparameters", "held_in", "held_out", "forgetting", "eval_limit"):
        assert getattr(routers, field) == getattr(demo, field), field
    shared = {s.name: s for s in demo.strategies}
    for strategy in routers.strategies:
        if strategy.name in shared:  # same settings, so the demo's cached scores apply
            assert strategy == shared[strategy.name], strategy.name
    kinds = {s.options.router for s in routers.strategies if s.kind == "router"}
    assert kinds == {"uniform", "centroid", "arrow", "phatgoose", "glider", "learned"}
