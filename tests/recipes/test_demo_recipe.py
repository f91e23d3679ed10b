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
