"""Every router on the tiny model; oracle exactness against peft; Arrow against an independent SVD."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from route_helpers import EXPERT_SPECS, load_tiny, make_expert, task_examples
from safetensors.torch import load_file

from moerge.data.formats import MOERGE
from moerge.errors import MoergeError
from moerge.route import Routing, attach_experts, get_router, prepare_router, router_names, routing_context
from moerge.route.embed import encode_prompts
from moerge.route.explain import explain_routing, routing_accuracy
from moerge.route.folder import make_policy
from moerge.route.router import module_key
from moerge.route.routers.learned import load_balancing_loss
from moerge.route.stacked import Step

NAMES = list(EXPERT_SPECS)
FAST = {"steps": 2, "iters": 5}  # given to the routers that take them (others refuse unknown options)


@pytest.fixture(scope="module")
def routed(tiny_base, experts):
    model, tokenizer = load_tiny(tiny_base)
    return attach_experts(model, [experts[n] for n in NAMES]), tokenizer


def _route(routed, expert_data, name, policy=None, **options):
    handle, tokenizer = routed
    fast = {k: v for k, v in FAST.items() if k in get_router(name).options_model.model_fields}
    router = prepare_router(handle, name, tokenizer=tokenizer, options={**fast, **options}, data=expert_data)
    return Routing(handle, router, make_policy(name, policy))


def _mixed_batch(tokenizer):
    examples = [task_examples(n)[i] for i, n in enumerate(NAMES)]
    return examples, *encode_prompts(tokenizer, examples, MOERGE)


def test_oracle_reproduces_each_expert_on_a_mixed_batch(routed, expert_data, tiny_base, experts):
    handle, tokenizer = routed
    _route(routed, expert_data, "oracle")
    _, ids, mask = _mixed_batch(tokenizer)
    with torch.no_grad(), routing_context(task_ids=[f"task_{n}" for n in NAMES]):
        ours = handle.model(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(NAMES):
        peft = PeftModel.from_pretrained(load_tiny(tiny_base)[0], str(experts[name])).eval()
        with torch.no_grad():
            theirs = peft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours[row][mask[row].bool()], theirs[row][mask[row].bool()], rtol=1e-5, atol=1e-5)
    with pytest.raises(MoergeError, match="task id"):
        handle.model(input_ids=ids, attention_mask=mask)


def test_oracle_generate_matches_peft(routed, expert_data, tiny_base, experts):
    handle, tokenizer = routed
    _route(routed, expert_data, "oracle")
    _, ids, mask = _mixed_batch(tokenizer)
    with routing_context(task_ids=["beta"] * 4):
        ours = handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    peft = PeftModel.from_pretrained(load_tiny(tiny_base)[0], str(experts["beta"])).eval()
    theirs = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache_argument", ["generate", "past_key_values"])
def test_example_routing_is_decided_once_on_the_prompt_while_generating(
    routed, expert_data, monkeypatch, cache_argument
):
    """Decode steps reuse the prompt's example-level weights, whichever name the cache is passed
    under (transformers 5's `generate` says `cache=`, explicit calls `past_key_values=`)."""
    from transformers import DynamicCache

    handle, tokenizer = routed
    routing = _route(routed, expert_data, "centroid", policy={"k": 1, "granularity": "example"})
    decided = []
    original = routing.router.example_scores
    monkeypatch.setattr(routing.router, "example_scores", lambda step: decided.append(step) or original(step))
    _, ids, mask = _mixed_batch(tokenizer)
    with torch.no_grad():
        if cache_argument == "generate":
            handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        else:
            cache = DynamicCache()
            handle.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            step_ids = ids[:, -1:]
            step_mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            handle.model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
    assert len(decided) == 1 and decided[0].prefill


def test_arrow_prototypes_equal_independent_svd(routed, expert_data, experts):
    routing = _route(routed, expert_data, "arrow")
    for k, name in enumerate(NAMES):
        raw = load_file(str(experts[name] / "adapter_model.safetensors"))
        for key, a in raw.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = raw[key.replace("lora_A", "lora_B")]
            top = torch.linalg.svd((b @ a).double()).Vh[0].float()
            proto = routing.router.state[module_key(module)][k]
            assert abs(float(proto @ top)) == pytest.approx(1.0, abs=1e-4)


def test_arrow_token_top_k_skips_missing_experts(routed, expert_data):
    handle, _tokenizer = routed
    routing = _route(routed, expert_data, "arrow", policy={"k": 2})
    layer = handle.layers["model.layers.0.self_attn.q_proj"]  # "gamma" has no q_proj
    handle.step = Step(None, torch.ones(2, 5, dtype=torch.bool), True)
    w = routing.weights(layer.name, torch.randn(2, 5, 64))
    assert ((w > 0).sum(-1) == 2).all() and (w[..., NAMES.index("gamma")] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))


def test_classifier_routes_each_example_of_a_mixed_batch_to_its_expert(routed, expert_data):
    handle, tokenizer = routed
    _route(routed, expert_data, "classifier", iters=100)
    report = explain_routing(handle.model, tokenizer, {n: expert_data[n] for n in NAMES}, dict.fromkeys(NAMES, MOERGE))
    assert routing_accuracy(report, {n: n for n in NAMES}) == 1.0
    _examples, ids, mask = _mixed_batch(tokenizer)
    handle.routing.start_recording()
    with torch.no_grad():
        handle.model(input_ids=ids, attention_mask=mask)
    for weights in handle.routing.records.values():
        assert weights[0].argmax(-1).tolist() == list(range(4))


def test_uniform_routing_shares_the_top_expert_evenly(routed, expert_data):
    handle, tokenizer = routed
    _route(routed, expert_data, "uniform")
    report = explain_routing(handle.model, tokenizer, {n: expert_data[n] for n in NAMES}, dict.fromkeys(NAMES, MOERGE))
    for row in report.values():
        assert row["top1"] == pytest.approx([1 / len(NAMES)] * len(NAMES))
    assert routing_accuracy(report, {n: n for n in NAMES}) == pytest.approx(1 / len(NAMES))


def test_task_granularity_shares_weights_within_a_task(routed, expert_data):
    handle, tokenizer = routed
    _route(routed, expert_data, "arrow", policy={"granularity": "task", "aggregation": "merge"})
    _, ids, mask = _mixed_batch(tokenizer)
    handle.routing.start_recording()
    with torch.no_grad(), routing_context(task_ids=["x", "y", "x", "y"]):
        handle.model(input_ids=ids, attention_mask=mask)
    for (weights,) in handle.routing.records.values():
        torch.testing.assert_close(weights[0], weights[2])
        torch.testing.assert_close(weights[1], weights[3])


@pytest.mark.parametrize("name", router_names())
def test_every_router_builds_and_runs(routed, expert_data, name):
    handle, tokenizer = routed
    routing = _route(routed, expert_data, name)
    _examples, ids, mask = _mixed_batch(tokenizer)
    routing.start_recording()
    with routing_context(task_ids=NAMES):
        out = handle.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (4, ids.shape[1] + 3)
    for weights in routing.records.values():
        torch.testing.assert_close(weights[0].sum(-1), torch.ones(4))
    assert set(routing.router.tensors()) or name in ("oracle", "uniform")


def test_phatgoose_gates_are_trained_and_learned_balances(routed, expert_data):
    routing = _route(routed, expert_data, "phatgoose", steps=3)
    gates = routing.router.state[module_key("model.layers.0.self_attn.q_proj")]
    assert gates[0].abs().sum() > 0 and gates[NAMES.index("gamma")].abs().sum() == 0
    scores = torch.zeros(10, 4)
    weights = torch.zeros(10, 4)
    weights[:, :2] = 0.5
    assert float(load_balancing_loss(scores, weights)) == pytest.approx(2.0)


def test_glider_text_describer_and_alpha(routed, expert_data):
    handle, tokenizer = routed
    texts = {n: f"tasks about {w}" for n, w in zip(NAMES, ["fruit", "numbers", "colours", "directions"], strict=True)}
    routing = _route(routed, expert_data, "glider", describer="text", descriptions=texts, alpha=1000.0)
    _, ids, mask = _mixed_batch(tokenizer)
    routing.start_recording()
    with torch.no_grad(), routing_context(task_descriptions=[texts[n] for n in NAMES]):
        handle.model(input_ids=ids, attention_mask=mask)
    # A large α lets the global description match dominate: each prompt's top expert is its own
    # wherever that expert adapts the module.
    for module, (weights,) in routing.records.items():
        present = handle.layers[module].present
        for row in range(4):
            assert not present[row] or int(weights[row].argmax()) == row
    with pytest.raises(MoergeError, match="descriptions"):
        _route(routed, expert_data, "glider", describer="text", descriptions={})


def test_glider_chat_describer_writes_descriptions(routed, expert_data):
    routing = _route(routed, expert_data, "glider", describer="chat", describe_examples=2)
    assert set(routing.router.derived["descriptions"]) == set(NAMES)
    assert routing.router.options.descriptions is None  # what the build wrote is not an option
    assert routing.router.state["descriptions"].shape == (4, 64)


def test_arrow_equals_peft_arrow_given_exact_prototypes(tiny_base, tmp_path):
    """Same routing formula as peft's Arrow once both use exact prototypes (peft uses power iteration)."""
    from peft import ArrowConfig, create_arrow_model

    spec = EXPERT_SPECS["alpha"]
    folders = [make_expert(tiny_base, tmp_path / f"e{i}", 10 + i, **spec) for i in range(3)]
    theirs = create_arrow_model(load_tiny(tiny_base)[0], [str(f) for f in folders], ArrowConfig(top_k=2)).eval()
    model, _ = load_tiny(tiny_base)
    handle = attach_experts(model, folders)
    routing = Routing(handle, prepare_router(handle, "arrow"), make_policy("arrow", {"k": 2}))
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        theirs(ids)  # builds peft's prototypes; then replace them by ours
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_arrow"):
                protos = routing.router.state[module_key(name)]
                module.lora_arrow["arrow_router"].prototypes = protos.clone()
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
