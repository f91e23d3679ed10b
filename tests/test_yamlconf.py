"""One config reader: every error is `file:line: field: message`."""

import pytest
from pydantic import BaseModel, ConfigDict, Field

from moerge.errors import MoergeError
from moerge.yamlconf import Source, load_config, read_yaml, validate, validate_options


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(1, ge=1)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    items: list[Inner] = []


def test_nested_error_names_file_line_and_field_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nitems:\n  - {k: 2}\n  - {k: 0}\n")
    with pytest.raises(MoergeError, match=r"c\.yaml:4: items\.1\.k: Input should be greater than or equal to 1$"):
        load_config(path, Outer, "test config")


def test_a_misspelt_key_is_reported_before_the_missing_one_it_causes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nmae: x\n")
    with pytest.raises(MoergeError, match=r"c\.yaml:1: nmae: Extra inputs are not permitted"):
        load_config(path, Outer, "test config")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00binary", r"not UTF-8 text \(expected a YAML test config\)"),
        (b"name: [unclosed\n", r"c\.yaml:2: invalid YAML"),
        (b"- a list\n", r"expected a mapping of test config settings, got list"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(MoergeError, match=message) as info:
        read_yaml(path, "test config")
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(MoergeError, match=r"nope\.yaml: not found \(expected a test config file\)"):
        read_yaml(tmp_path / "nope.yaml", "test config")


def test_options_refuse_a_key_with_the_accepted_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: x\nparameters:\n  k: 2\n  density: 0.3\n")
    raw, source = read_yaml(path, "merge config")
    with pytest.raises(
        MoergeError, match=r"c\.yaml:4: parameters\.density: not an option of method 'x' \(its options: k\)"
    ):
        validate_options(Inner, raw["parameters"], source.at("parameters"), "method 'x'")
    assert validate_options(Inner, {"k": 3}, source.at("parameters"), "method 'x'").k == 3


def test_sources_without_a_file_name_the_source():
    with pytest.raises(MoergeError, match=r"^command-line options: name: Field required$"):
        validate(Outer, {}, "command-line options")
    assert Source("f.yaml").at("a", 0).error(["b"], "bad").args[0] == "f.yaml: a.0.b: bad"
