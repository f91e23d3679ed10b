"""`moerge merge`: flags and YAML configs produce a merged expert; bad input is one line, exit 2."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moerge.cli.main import app
from moerge.errors import MoergeError
from moerge.library.expert import check_expert_intact

runner = CliRunner()
_KIT = Path(__file__).parents[1] / "merge" / "merge_testkit.py"
_spec = importlib.util.spec_from_file_location("merge_testkit_cli", _KIT)
assert _spec and _spec.loader
kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kit)


@pytest.fixture(scope="module")
def two_experts(tiny_base: Path, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli_experts")
    return [
        kit.make_lora(root / name, tiny_base, seed=i, fingerprint="fp-tiny", **kit.EXPERTS[name])
        for i, name in enumerate(("a", "b"))
    ]


def test_merge_with_flags_writes_an_adapter_expert(two_experts: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ties"
    experts = ",".join(str(p) for p in two_experts)
    args = ["merge", "--experts", experts, "--weights", "1,0.5", "--method", "ties", "--density", "0.3"]
    result = runner.invoke(app, [*args, "--rank", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "relative reconstruction error" in result.output
    meta = check_expert_intact(out)
    assert meta.method == "merge:ties" and meta.hyperparameters["weights"] == [1.0, 0.5]
    assert meta.provenance["parameters"]["density"] == 0.3 and meta.hyperparameters["rank"] == 2


def test_merge_from_yaml_with_overrides(two_experts: list[Path], tmp_path: Path) -> None:
    config = tmp_path / "soup.yaml"
    refs = "".join(f"  - path: {p}\n" for p in two_experts)
    config.write_text(f"method: linear\nexperts:\n{refs}output:\n  out: {tmp_path / 'ignored'}\n")
    out = tmp_path / "soup"
    result = runner.invoke(
        app, ["merge", str(config), "--out", str(out), "--lines-alpha", "0.5", "--lines-beta", "0.5"]
    )
    assert result.exit_code == 0, result.output
    meta = check_expert_intact(out)
    assert meta.method == "merge:linear" and meta.hyperparameters["exact"] is True
    assert meta.provenance["parameters"]["lines_alpha"] == 0.5 and not (tmp_path / "ignored").exists()


def test_errors_are_moerge_errors(two_experts: list[Path], tmp_path: Path) -> None:
    experts = ",".join(str(p) for p in two_experts)
    cases = [
        (["--experts", experts, "--weights", "1", "--method", "ties"], "--weights: 1 weights for 2 experts"),
        (
            ["--experts", experts, "--weights", "1,x", "--method", "ties"],
            "--weights: expected comma-separated",
        ),
        (["--experts", experts], "--method: required without a config file"),
        (["--experts", experts, "--method", "soup", "--out", "o"], "unknown merge method 'soup'"),
        (
            ["--experts", experts, "--method", "linear", "--density", "0.2", "--out", "o"],
            "parameters.density: not an option of merge method 'linear' (its options: scaling, lines_alpha, lines_beta",
        ),
        (
            ["--experts", experts, "--method", "ties", "--seed", "1", "--out", "o"],
            "not an option of merge method 'ties'",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["merge", *args])
        assert isinstance(result.exception, MoergeError), result.output
        assert message in str(result.exception)


def test_help_lists_every_method_with_its_own_options() -> None:
    from moerge.cli.merge import methods_help
    from moerge.merge.methods import MERGE_METHODS, MergeOptions

    text = methods_help()
    for name, method in MERGE_METHODS.items():
        assert f"[bold]{name}[/bold]: {method.summary}" in text
        for option, field in method.options.model_fields.items():
            if option not in MergeOptions.model_fields:
                assert f"--{option.replace('_', '-')}: {field.description}" in text
    for option, field in MergeOptions.model_fields.items():
        assert f"--{option.replace('_', '-')}: {field.description}" in text
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0 and "Merge methods (--method)" in result.output
    assert all(name in result.output for name in MERGE_METHODS.names())


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("method: ties\nexperts:\n  - {path: x}\noutput: {out: o, rank: -1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "moerge.cli", "merge", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert f"{config}:4: output.rank" in proc.stderr
