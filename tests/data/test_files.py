"""Data files and saved `datasets` folders: fields, splits, and one-line errors naming the row."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_jsonl
from moerge.data import load_task
from moerge.errors import MoergeError


def qa_rows(n: int) -> list[dict]:
    return [{"input": f"What is {i} + 1?", "target": str(i + 1)} for i in range(n)]


def test_jsonl_loads_every_example_once_with_seeded_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "add.jsonl", qa_rows(50))
    task = load_task(str(path), seed=3)
    assert task.name == "add" and task.source == str(path)
    assert task.sizes() == {"train": 35, "validation": 5, "test": 10}
    seen = sorted(ex.input for split in ("train", "validation", "test") for ex in task.split(split))
    assert seen == sorted(r["input"] for r in qa_rows(50))
    assert not task.is_multiple_choice
    again = load_task(str(path), seed=3)
    assert again.data_hash() == task.data_hash() and again.test == task.test
    assert load_task(str(path), seed=4).test != task.test


def test_numbers_become_text_and_choices_make_multiple_choice(tmp_path: Path) -> None:
    rows = [{"input": f"q{i}", "target": i % 2, "choices": [0, 1]} for i in range(10)]
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", rows)))
    assert task.is_multiple_choice
    example = next(ex for ex in task.train + task.validation + task.test if ex.input == "q3")
    assert example.target == "1" and example.choices == ("0", "1")


def test_csv_choices_as_json_or_pipes_and_split_column(tmp_path: Path) -> None:
    path = tmp_path / "sent.csv"
    path.write_text(
        "input,target,choices,split\n"
        'good,pos,"[""pos"", ""neg""]",train\n'
        "bad,neg,pos|neg,train\n"
        '"multi\nline",pos,pos|neg,test\n'
        "meh,neg,pos|neg,validation\n"
    )
    task = load_task(str(path))
    assert [ex.input for ex in task.train] == ["good", "bad"]
    assert [ex.input for ex in task.test] == ["multi\nline"]
    assert [ex.input for ex in task.validation] == ["meh"]
    assert all(ex.choices == ("pos", "neg") for ex in task.train + task.test)


def test_parquet(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "p.parquet"
    pd.DataFrame({"input": ["a", "b", "c", "d"], "target": ["x", "y", "x", "y"]}).to_parquet(path)
    task = load_task(str(path))
    assert sum(task.sizes().values()) == 4 and task.name == "p"
    pd.DataFrame({"input": ["a", None], "target": ["x", "y"]}).to_parquet(path)
    with pytest.raises(MoergeError, match=r"p\.parquet:2: missing field 'input'"):
        load_task(str(path))


def test_split_column_missing_splits_are_cut_from_train(tmp_path: Path) -> None:
    rows = [dict(r, split="train") for r in qa_rows(30)] + [dict(r, split="test") for r in qa_rows(35)[30:]]
    task = load_task(str(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert [ex.target for ex in task.test] == ["31", "32", "33", "34", "35"]
    assert len(task.validation) == 3 and len(task.train) == 27
    assert not set(task.validation) & set(task.train)


def test_limit_is_seeded_and_applies_before_splitting(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "big.jsonl", qa_rows(200)))
    task = load_task(path, limit=20, seed=1)
    assert sum(task.sizes().values()) == 20
    assert load_task(path, limit=20, seed=1).data_hash() == task.data_hash()
    assert load_task(path, limit=20, seed=2).data_hash() != task.data_hash()
    with pytest.raises(MoergeError, match="--limit"):
        load_task(path, limit=0)


def test_datasets_folder_dataset_and_dataset_dict(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    data = Dataset.from_list(qa_rows(40))
    data.save_to_disk(str(tmp_path / "flat"))
    flat = load_task(str(tmp_path / "flat"))
    assert flat.name == "flat" and flat.sizes() == {"train": 28, "validation": 4, "test": 8}

    DatasetDict({"train": data, "test": Dataset.from_list(qa_rows(45)[40:])}).save_to_disk(str(tmp_path / "dd"))
    task = load_task(str(tmp_path / "dd"))
    assert [ex.target for ex in task.test] == ["41", "42", "43", "44", "45"]
    assert len(task.validation) == 4 and len(task.train) == 36

    bad = Dataset.from_list([{"input": "a", "target": "b"}, {"input": "c", "target": None}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(MoergeError, match=r"bad:2: missing field 'target'"):
        load_task(str(tmp_path / "bad"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"input": "a", "target": "b"}\n\n{"input": "c", "target": "d"}\n{"input": oops}\n',
            r":4: invalid JSON",
        ),
        ('{"input": "a", "target": "b"}\n{"input": "c"}\n', r":2: missing field 'target'"),
        ('{"target": "b"}\n', r":1: missing field 'input'"),
        (
            '{"input": "a", "target": "c", "choices": ["a", "b"]}\n',
            r":1: target 'c' is not one of the choices",
        ),
        ('{"input": "a", "target": "a", "choices": "a"}\n', r":1: field 'choices' needs at least 2"),
        ('{"input": ["a"], "target": "a"}\n', r":1: field 'input' must be a string"),
        ("[1, 2]\n", r":1: expected an object"),
        ('{"input": "a", "target": "b", "split": "dev"}\n', r":1: split 'dev' must be one of"),
        (
            '{"input": "a", "target": "b", "split": "test"}\n{"input": "a", "target": "b"}\n',
            r":2: field 'split'",
        ),
        ("\n\n", r": the task has no examples"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(MoergeError, match="^" + str(path).replace(".", r"\.") + message):
        load_task(str(path))


def test_csv_error_names_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("input,target\na,b\nc,\n")
    with pytest.raises(MoergeError, match=r"d\.csv:3: missing field 'target'"):
        load_task(str(path))


def test_missing_file_and_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(MoergeError, match=r"nope\.jsonl: file not found"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(
        MoergeError,
        match=r"^foo:bar: unknown task source 'foo'; known sources: (?=.*gym:<gen)(?=.*bigbench:<task>)",
    ):
        load_task("foo:bar")
    with pytest.raises(MoergeError, match=r"no such data file or folder.*\.jsonl"):
        load_task(str(tmp_path / "notes.txt"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MoergeError, match=r"notes\.txt: unsupported file type \.txt; known sources"):
        load_task(str(tmp_path / "notes.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MoergeError, match="not a folder saved with datasets"):
        load_task(str(tmp_path / "empty_dir"))
