"""The subspace merges (tsv, iso_c, iso_cts, knots) against references written from the papers' equations.

The references below use torch.linalg.svd step by step, in float64, on the exact low-rank factors; moerge
gets the float32 products, as the merge pipeline does. Ranks are the references' own numerical ranks
(`torch.linalg.matrix_rank`): components with zero singular value are not part of an update.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_testkit import peft_deltas
from peft.utils import merge_utils
from typer.testing import CliRunner

from moerge.cli.main import app
from moerge.errors import MoergeError
from moerge.library.expert import check_expert_intact
from moerge.merge import subspace
from moerge.merge.methods import MERGE_METHODS
from moerge.merge.subspace import common_budget

METHODS = ["tsv", "iso_c", "iso_cts", "knots"]
WEIGHTS = [0.7, 1.3, 0.4]


# --- inputs ------------------------------------------------------------------------------------------


def lora_factors(seed: int, ranks: list[int], shape: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per expert in float64: A is r × in, B is out × r."""
    generator = torch.Generator().manual_seed(seed)
    out, inp = shape
    return [
        (
            torch.randn(r, inp, generator=generator, dtype=torch.float64),
            torch.randn(out, r, generator=generator).double(),
        )
        for r in ranks
    ]


def products(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.stack([b @ a for a, b in factors])


def full_rank(seed: int, n: int, shape: tuple[int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64)


def run(name: str, deltas: torch.Tensor, weights: list[float], **params: object) -> torch.Tensor:
    method = MERGE_METHODS.get(name)
    return method.fn(deltas.float(), torch.tensor(weights), method.parse_options(params)).double()


def assert_matches(ours: torch.Tensor, reference: torch.Tensor) -> None:
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * scale)


# --- references from the papers ----------------------------------------------------------------------


def rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix))


def orthogonal_procrustes(matrix: torch.Tensor) -> torch.Tensor:
    """X⊥ = P Qᵀ where X = P S Qᵀ."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def reference_tsv(deltas: torch.Tensor, weights: list[float], keep: int) -> torch.Tensor:
    """Gargiulo et al. 2025 (TSV-M): per task the top-k SVD components, U = [U_1 … U_T], Σ = diag(Σ_1 … Σ_T),
    V = [V_1 … V_T]; U⊥, V⊥ by orthogonal Procrustes; M = U⊥ Σ V⊥ᵀ."""
    us, ss, vs = [], [], []
    for delta, weight in zip(deltas, weights, strict=True):
        task = weight * delta
        u, s, vh = torch.linalg.svd(task, full_matrices=False)
        k = min(keep, rank(task))
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_perp = orthogonal_procrustes(torch.cat(us, dim=1))
    v_perp = orthogonal_procrustes(torch.cat(vs, dim=1))
    return u_perp @ torch.diag(torch.cat(ss)) @ v_perp.T


def reference_iso_c(deltas: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Marczak et al. 2025 (Iso-C): Δ_TA = Σ_t Δ_t = U Σ Vᵀ, M = σ̄ U Vᵀ with σ̄ the mean singular value."""
    total = sum(w * d for w, d in zip(weights, deltas, strict=True))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = rank(total)
    return s[:r].mean() * u[:, :r] @ vh[:r]


def reference_iso_cts(deltas: torch.Tensor, weights: list[float], fraction: float) -> torch.Tensor:
    """Marczak et al. 2025 (Iso-CTS): common subspace = top-k singular vectors of Δ_TA; task t contributes
    the top-s singular vectors of Δ_t − U_k U_kᵀ Δ_t; U, V stacked and orthogonalised; σ̄ the mean of all
    the kept singular values."""
    tasks = [w * d for w, d in zip(weights, deltas, strict=True)]
    total = sum(tasks)
    r = rank(total)
    k = int(r * fraction)
    s_task = round((r - k) / len(tasks))
    k = r - s_task * len(tasks)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    for task in tasks:
        residual = task - u[:, :k] @ u[:, :k].T @ task
        u_t, s_t, vh_t = torch.linalg.svd(residual, full_matrices=False)
        n = min(s_task, rank(residual))
        us.append(u_t[:, :n])
        ss.append(s_t[:n])
        vs.append(vh_t[:n].T)
    sigma = torch.cat(ss).mean()
    return sigma * orthogonal_procrustes(torch.cat(us, dim=1)) @ orthogonal_procrustes(torch.cat(vs, dim=1)).T


def reference_knots(deltas: torch.Tensor, weights: list[float], inner: str, density: float = 1.0) -> torch.Tensor:
    """Stoica et al. 2024 (KnOTS): [Δ_1 … Δ_T] = U Σ [V_1ᵀ … V_Tᵀ]; merge the Σ V_tᵀ (TIES as peft defines it,
    or the weighted average); M = U · merged."""
    concatenated = torch.cat(list(deltas), dim=1)
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    r = rank(concatenated)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    coordinates = [torch.diag(s) @ v for v in torch.split(vh, deltas.shape[2], dim=1)]
    w = torch.tensor(weights, dtype=torch.float64)
    if inner == "ties":
        merged = merge_utils.ties(coordinates, w, density, "total")
    else:
        merged = sum(wk * c for wk, c in zip(weights, coordinates, strict=True)) / sum(weights)
    return u @ merged


# --- against the references --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("ranks", [[4, 2, 6], [3, 3, 3]])
def test_lora_updates_match_references(shape: tuple[int, int], ranks: list[int]) -> None:
    deltas = products(lora_factors(sum(ranks), ranks, shape))
    keep = int(min(shape) / 3)
    assert_matches(run("tsv", deltas, WEIGHTS), reference_tsv(deltas, WEIGHTS, keep))
    assert_matches(run("iso_c", deltas, WEIGHTS), reference_iso_c(deltas, WEIGHTS))
    assert_matches(run("iso_cts", deltas, WEIGHTS, common_fraction=0.5), reference_iso_cts(deltas, WEIGHTS, 0.5))
    assert_matches(run("knots", deltas, WEIGHTS, inner="linear"), reference_knots(deltas, WEIGHTS, "linear"))
    for density in (0.2, 0.6, 1.0):
        ours = run("knots", deltas, WEIGHTS, inner="ties", density=density)
        assert_matches(ours, reference_knots(deltas, WEIGHTS, "ties", density))


@pytest.mark.parametrize("shape", [(24, 40), (30, 30)])
def test_full_rank_updates_match_references(shape: tuple[int, int]) -> None:
    """Full fine-tuning updates: the papers' own setting (every singular value non-zero)."""
    deltas = full_rank(5, 3, shape)
    assert_matches(run("tsv", deltas, WEIGHTS), reference_tsv(deltas, WEIGHTS, int(min(shape) / 3)))
    assert_matches(run("tsv", deltas, WEIGHTS, density=0.1), reference_tsv(deltas, WEIGHTS, int(0.1 * min(shape))))
    assert_matches(run("iso_c", deltas, WEIGHTS), reference_iso_c(deltas, WEIGHTS))
    for fraction in (0.8, 0.3):
        ours = run("iso_cts", deltas, WEIGHTS, common_fraction=fraction)
        assert_matches(ours, reference_iso_cts(deltas, WEIGHTS, fraction))
    assert_matches(run("knots", deltas, WEIGHTS), reference_knots(deltas, WEIGHTS, "ties", 0.2))


@pytest.mark.parametrize("name", METHODS)
def test_factored_form_equals_dense_form(name: str) -> None:
    """From the LoRA factors, with an expert that lacks the module: the same update, rank ≤ Σ r_k."""
    factors = lora_factors(3, [4, 2, 5], (24, 40))
    deltas = products(factors)
    deltas[1] = 0
    method = MERGE_METHODS.get(name)
    options = method.parse_options({})
    pairs = [(a.float(), b.float()) for a, b in factors]
    a, b = method.factored([pairs[0], None, pairs[2]], torch.tensor(WEIGHTS), options)
    assert a.dtype == b.dtype == torch.float32 and a.shape[0] <= 9
    dense = method.fn(deltas.float(), torch.tensor(WEIGHTS), options)
    assert_matches((b @ a).double(), dense.double())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("kind", ["full", "low-rank", "zero"])
def test_svd_blocks_agree_with_torch(shape: tuple[int, int], kind: str) -> None:
    """The Gram-based dense SVD and the QR-based factored SVD keep exactly the non-zero spectrum."""
    if kind == "full":
        matrix = full_rank(1, 1, shape)[0]
        a, b = subspace.factors_of_dense(matrix)  # factors of a full-rank update: r = min(shape)
    else:
        ((a, b),) = lora_factors(1, [5], shape)
        a = a * (kind == "low-rank")
        matrix = b @ a
    expected = torch.linalg.svdvals(matrix)[: rank(matrix)]
    for u, s, vh in (subspace.svd(matrix.float()), subspace.svd_of_factors(a.float(), b.float())):
        assert len(s) == len(expected)
        torch.testing.assert_close(s, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(u @ torch.diag(s) @ vh, matrix, rtol=0, atol=1e-5 * (1 + float(matrix.abs().max())))
        torch.testing.assert_close(u.T @ u, torch.eye(len(s)).double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(vh @ vh.T, torch.eye(len(s)).double(), rtol=0, atol=1e-6)


def test_registrations() -> None:
    for name in METHODS:
        method = MERGE_METHODS.get(name)
        assert not method.is_linear and method.experts is None and method.factored is not None
    assert MERGE_METHODS.get("iso_c").options.model_fields.keys() == {"scaling", "lines_alpha", "lines_beta"}


# --- properties --------------------------------------------------------------------------------------


def test_iso_c_spectrum_is_flat_inside_the_sums_subspace() -> None:
    deltas = products(lora_factors(1, [4, 2, 6], (24, 40)))
    merged = run("iso_c", deltas, WEIGHTS)
    total = sum(w * d for w, d in zip(WEIGHTS, deltas.double(), strict=True))
    values = torch.linalg.svdvals(merged)
    r = rank(total)
    assert rank(merged.float()) == r == 12  # float32 output: its own noise floor
    mean = float(torch.linalg.svdvals(total)[:r].mean())
    torch.testing.assert_close(values[:r], torch.full((r,), mean, dtype=torch.float64), rtol=1e-5, atol=0)
    u = torch.linalg.svd(total)[0][:, :r]
    assert_matches(u @ u.T @ merged, merged)  # no direction outside the sum's column space


def test_iso_cts_with_everything_common_is_iso_c() -> None:
    deltas = full_rank(2, 3, (20, 16))
    assert_matches(run("iso_cts", deltas, WEIGHTS, common_fraction=1.0), run("iso_c", deltas, WEIGHTS))


def test_one_full_rank_expert_is_kept() -> None:
    (delta,) = full_rank(4, 1, (12, 18))
    assert_matches(run("tsv", delta[None], [1.0]), delta)  # default density 1/K = 1
    assert_matches(run("knots", delta[None], [1.0], inner="linear"), delta)
    assert_matches(run("knots", delta[None], [1.0], inner="ties", density=1.0), delta)


def test_tsv_of_orthogonal_experts_is_their_sum() -> None:
    """Singular vectors already orthogonal across experts: the decorrelation changes nothing."""
    generator = torch.Generator().manual_seed(8)
    left = torch.linalg.qr(torch.randn(30, 7, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(40, 7, generator=generator, dtype=torch.float64))[0]
    first = left[:, :3] @ torch.diag(torch.tensor([5.0, 3.0, 1.0]).double()) @ right[:, :3].T
    second = left[:, 3:] @ torch.diag(torch.tensor([4.0, 2.0, 1.5, 0.5]).double()) @ right[:, 3:].T
    assert_matches(run("tsv", torch.stack([first, second]), [1.0, 1.0]), first + second)


def test_knots_linear_is_the_weighted_average() -> None:
    """The shared basis is exact, so averaging the coordinates averages the updates."""
    deltas = products(lora_factors(6, [4, 2, 6], (24, 40)))
    expected = sum(w * d for w, d in zip(WEIGHTS, deltas, strict=True)) / sum(WEIGHTS)
    assert_matches(run("knots", deltas, WEIGHTS, inner="linear"), expected)


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_knots_ties_ignores_an_expert_without_the_module(density: float) -> None:
    """Its coordinates are exactly zero, so they cast no TIES votes (rounding noise would halve the others)."""
    (delta,) = products(lora_factors(2, [3], (32, 24)))
    alone = run("knots", delta[None], [0.5], density=density)
    assert_matches(run("knots", torch.stack([torch.zeros_like(delta), delta]), [1.0, 0.5], density=density), alone)
    if density == 1.0:
        assert_matches(alone, 0.5 * delta)


def test_parameters_without_singular_vectors_fall_back_to_task_arithmetic() -> None:
    biases = full_rank(3, 3, (16, 1))[..., 0]  # (experts, 16)
    expected = sum(w * b for w, b in zip(WEIGHTS, biases, strict=True))
    for name in METHODS:
        assert_matches(run(name, biases, WEIGHTS), expected)


@pytest.mark.parametrize(
    ("rank_", "fraction", "tasks"), [(64, 0.8, 3), (10, 0.8, 3), (3, 0.0, 2), (7, 0.5, 8), (1, 1.0, 4)]
)
def test_common_budget_uses_every_direction(rank_: int, fraction: float, tasks: int) -> None:
    common, per_task = common_budget(rank_, fraction, tasks)
    assert common >= 0 and per_task >= 0 and common + tasks * per_task == rank_


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("tsv", {"density": 0}, "parameters.density: Input should be greater than 0"),
        ("iso_cts", {"common_fraction": 1.5}, "parameters.common_fraction: Input should be less than or equal to 1"),
        ("knots", {"inner": "dare"}, "parameters.inner: Input should be 'ties' or 'linear'"),
        ("iso_c", {"density": 0.5}, "parameters.density: not an option of merge method 'iso_c'"),
    ],
)
def test_bad_parameters_are_refused(method: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(MoergeError, match=message):
        MERGE_METHODS.get(method).parse_options(params)


# --- the reference implementation, where it is installed ----------------------------------------------


def test_against_fusion_bench() -> None:
    """FusionBench's TSV-M, Iso-C and Iso-CTS on full-rank task vectors (their setting)."""
    iso = pytest.importorskip(
        "fusion_bench.method.isotropic_merging.iso_utils",
        reason="fusion-bench is not installed (it pulls lightning, hydra-core, tensorboard, datasets ...)",
    )
    tsvm = pytest.importorskip("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
    deltas = full_rank(9, 3, (24, 40))
    ones = [1.0, 1.0, 1.0]
    task_vectors = [{"w": d} for d in deltas]
    assert_matches(run("iso_c", deltas, ones), iso.iso_c(task_vectors, accelerator="cpu")["w"])
    expected = iso.iso_cts(task_vectors, common_space_fraction=0.8, accelerator="cpu")["w"]
    assert_matches(run("iso_cts", deltas, ones, common_fraction=0.8), expected)
    expected = tsvm.compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")["w"]
    assert_matches(run("tsv", deltas, ones), expected)


# --- through the command line: adapter and full outputs ------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("tsv", {}),
        ("iso_c", {}),
        ("iso_cts", {"common_fraction": 0.5}),
        ("knots", {}),
        ("knots", {"inner": "linear"}),
    ],
)
def test_cli_merge_writes_an_adapter_peft_loads(
    name: str, parameters: dict[str, object], experts: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """Rank 6 = 4 + 2 holds every merged update exactly; peft's deltas are the method's merge of the
    sources' own peft deltas (a module only one expert adapts included)."""
    out = tmp_path / name
    sources = [experts["a"], experts["b"]]
    flags = [part for key, value in parameters.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    args = ["merge", "--experts", ",".join(map(str, sources)), "--weights", "1,0.5", "--method", name, *flags]
    result = runner.invoke(app, [*args, "--rank", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = check_expert_intact(out)
    assert meta.method == f"merge:{name}" and meta.provenance["reconstruction_error_max"] < 1e-4
    assert parameters.items() <= meta.provenance["parameters"].items()
    merged = peft_deltas(tiny_base, out)
    inputs = [peft_deltas(tiny_base, folder) for folder in sources]
    method = MERGE_METHODS.get(name)
    assert sorted(merged) == sorted(set(inputs[0]) | set(inputs[1]))
    for module, delta in merged.items():
        like = next(d[module] for d in inputs if module in d)
        stacked = torch.stack([d.get(module, torch.zeros_like(like)) for d in inputs])
        expected = method.fn(stacked, torch.tensor([1.0, 0.5]), method.parse_options(parameters))
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4, msg=module)


@pytest.mark.parametrize(
    ("name", "parameters"), [("iso_cts", {"common_fraction": 0.5}), ("knots", {"inner": "linear"})]
)
def test_yaml_config_full_output(
    name: str, parameters: dict[str, object], experts: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """`kind: full` with the method's own options from YAML: each weight is the base's plus the merge."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    refs = f"  - path: {experts['a']}\n  - path: {experts['c']}\n"
    output = f"{{kind: full, base: {tiny_base}, out: {out}}}"
    config.write_text(f"method: {name}\nparameters: {json.dumps(parameters)}\nexperts:\n{refs}output: {output}\n")
    result = runner.invoke(app, ["merge", str(config)])
    assert result.exit_code == 0, result.output
    assert parameters.items() <= check_expert_intact(out).provenance["parameters"].items()
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    method = MERGE_METHODS.get(name)
    inputs = [peft_deltas(tiny_base, experts[e]) for e in ("a", "c")]
    for module in ("model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj"):  # both, then a only
        stacked = torch.stack([d.get(module, torch.zeros_like(inputs[0][module])) for d in inputs])
        expected = method.fn(stacked, torch.ones(2), method.parse_options(parameters))
        torch.testing.assert_close(state[f"{module}.weight"], base[f"{module}.weight"] + expected, atol=1e-5, rtol=1e-4)
