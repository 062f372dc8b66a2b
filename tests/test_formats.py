"""docs/FORMATS.md is generated from the models; every file's model round-trips (dump -> validate -> same)."""

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from fragcli import records
from fragcli.bench import BenchRecord
from fragcli.formats import BLOCK_DOCS, DOC, HEAD_DOCS, render
from fragcli.manifest import Manifest
from fragcli.profiling.recorder import BLOCK_TYPES, HEAD_TYPES
from fragcli.report import schema
from fragcli.sweep import SweepRecord
from fragcli.techniques.head_selection import HeadSelection

MODELS = [records.ProfileContext, records.ValidationRecord, records.RunRecord, schema.ReportSummary,
          schema.RegressionDiff, schema.HeadImportance, schema.ComparedReport, Manifest, HeadSelection, BenchRecord,
          SweepRecord]


def sample(tp: Any) -> Any:
    """A valid JSON value for an annotation: every field filled, the first choice of every union."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return args[0]
    if origin in (Union, types.UnionType):
        return sample(next(a for a in args if a is not type(None)))
    if origin in (list, set) or origin is typing.Sequence:
        return [sample(args[0])]
    if origin is tuple:
        return [sample(a) for a in args]
    if origin is dict:
        return {"k": sample(args[1])}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {(f.alias or name): sample(f.annotation) for name, f in tp.model_fields.items()}
    return {str: "0" * 64, int: 3, float: 0.5, bool: True}.get(tp, None)


def test_formats_doc_is_up_to_date():
    assert DOC.is_file() and DOC.read_text(encoding="utf-8") == render(), (
        "docs/FORMATS.md differs from the models: run python -m fragcli.formats --write (or make formats)")


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_round_trip(cls):
    data = cls.model_validate(sample(cls)).model_dump(by_alias=True, mode="json")
    again = cls.model_validate(data)
    assert again.model_dump(by_alias=True, mode="json") == data
    assert "_type" in data and "schema_version" in data


def test_every_parquet_column_is_described():
    assert set(HEAD_DOCS) == set(HEAD_TYPES) and set(BLOCK_DOCS) == set(BLOCK_TYPES)


def test_a_registered_technique_is_documented():
    from fragcli.techniques import REGISTRY
    from tests.toy_technique import ZeroChannel

    toy = ZeroChannel()
    REGISTRY.register(toy)
    try:
        text = render()
    finally:
        REGISTRY.unregister(toy.name)
    assert "### `toy_ffn.parquet`" in text and "`toy_zero_channel` config (version 1)" in text
    assert text != render()


def test_records_refuse_unknown_keys_and_versions(tmp_path):
    from fragcli.errors import FragError

    data = records.RunRecord.model_validate(sample(records.RunRecord)).dump()
    with pytest.raises(FragError, match=r"run.json is invalid at surprise: Extra inputs"):
        records.parse_record(records.RunRecord, {**data, "surprise": 1}, tmp_path / "run.json")
    with pytest.raises(FragError, match=r"schema_version 7; this frag reads 1 -- upgrade frag"):
        records.parse_record(records.RunRecord, {**data, "schema_version": 7}, tmp_path / "run.json")
    with pytest.raises(FragError, match=r"not a frag run record"):
        records.parse_record(records.RunRecord, [], tmp_path / "run.json")
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(FragError, match="malformed"):
        records.read_record(records.RunRecord, tmp_path / "run.json")
