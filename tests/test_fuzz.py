"""Nothing lost, nothing crashes: property-based fuzzing (hypothesis) of every file frag reads.

Each mutation of a file frag wrote is either accepted (a fragment then loads with weights identical, bit for bit,
to the pristine fragment's) or refused with frag's own one-line ``FragError``, and a refusal leaves the model as
it was. One tiny profile + fragment is built per module; every example damages a copy of one of its files.
``pytest tests/test_fuzz.py --hypothesis-show-statistics`` shows what was accepted and why the rest was refused;
``FRAG_FUZZ_SCALE=10`` runs ten times as many examples (a deeper search, by hand).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from fragcli import api
from fragcli.bench import read_bench
from fragcli.errors import FragError
from fragcli.fragment import load_fragment
from fragcli.manifest import content_hash, read_manifest
from fragcli.models import load_model
from fragcli.paths import read_json
from fragcli.profiling.data import ProfileData, read_context, read_profile
from fragcli.profiling.recorder import BLOCK_TYPES
from fragcli.records import RunRecord, ValidationRecord, parse_record, read_record
from fragcli.report.collect import collect_run
from fragcli.report.heads import head_importance
from fragcli.techniques.head_prune import heads_per_module
from fragcli.techniques.head_selection import HeadSelection, SelectionParams, plan, score_heads
from fragcli.thresholds import Thresholds, load_thresholds

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


def fuzz(n: int):
    """Fixed examples (derandomized), no deadline, few enough that the whole file runs in about a minute."""
    n = max(1, round(n * float(os.environ.get("FRAG_FUZZ_SCALE", "1"))))
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------------- mutations

ODD_NUMBERS = [-1, 0, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, math.nan, math.inf, -math.inf, True]
ODD_TEXT = ["", " ", "../x", "/etc/passwd", "a\x00b", "x" * 300, "\ud800", "é", "NaN", "null", "1e999", "..", "."]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(ODD_NUMBERS),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.sampled_from(ODD_TEXT))
JUNK = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)
KEY = st.text(max_size=10) | st.sampled_from(ODD_TEXT)
COLUMN = st.text(st.characters(exclude_categories=["Cs"]), max_size=10)  # Parquet names are UTF-8
SPECIAL_FILES = [b"", b"null", b"[]", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 5000, b"1" * 5000,
                 b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\x00" * 8]


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    return [path] + [p for k, v in items for p in _nodes(v, (*path, k))]


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _retyped(value: Any) -> list[Any]:
    """The same value as other JSON types."""
    out: list[Any] = [str(value), [value], {"value": value}]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return out
    return [*out, float(value), -value, value * 10**12, int(value) if math.isfinite(value) else 0]


@st.composite
def json_mutation(draw, doc: Any) -> Any:
    """One structured change anywhere in ``doc``: delete, replace with junk, an odd number or another type, add an
    unknown key, rename a key, duplicate or drop list items."""
    doc = copy.deepcopy(doc)
    path = draw(st.sampled_from(_nodes(doc)))
    node = _get(doc, path)
    ops = ["junk", "odd"] + (["delete", "retype"] if path else [])
    ops += (["add_key", "rename"] if node else ["add_key"]) if isinstance(node, dict) else []
    ops += ["duplicate", "truncate"] if isinstance(node, list) and node else []
    op = draw(st.sampled_from(ops))
    if op == "add_key":
        node[draw(KEY)] = draw(JUNK)
    elif op == "rename":
        old, new = draw(st.sampled_from(sorted(node, key=str))), draw(KEY | st.sampled_from(sorted(node, key=str)))
        node[new] = node.pop(old)
    elif op == "duplicate":
        node.append(copy.deepcopy(draw(st.sampled_from(node))))
    elif op == "truncate":
        del node[draw(st.integers(0, len(node) - 1)):]
    elif op == "delete":
        del _get(doc, path[:-1])[path[-1]]
    else:
        new = draw(JUNK if op == "junk" else st.sampled_from(ODD_NUMBERS + ODD_TEXT if op == "odd" else _retyped(node)))
        if not path:
            return new
        _get(doc, path[:-1])[path[-1]] = new
    return doc


@st.composite
def json_mutations(draw, doc: Any) -> Any:
    for _ in range(draw(st.integers(1, 2))):
        doc = draw(json_mutation(doc))
    return doc


@st.composite
def raw_mutation(draw, data: bytes) -> bytes:
    """Byte-level damage: truncate, flip or insert bytes (often non-UTF-8), or a pathological file."""
    op = draw(st.sampled_from(["truncate", "flip", "insert", "special"]))
    i = draw(st.integers(0, len(data) - 1))
    if op == "special":
        return draw(st.sampled_from(SPECIAL_FILES))
    if op == "truncate":
        return data[:i]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    junk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x00"]))
    return data[:i] + junk + data[i:]


def dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True, default=str).encode()


def rehashed(doc: Any) -> Any:
    """A manifest whose content_sha256 matches its mutated content (when it can be computed)."""
    try:
        return {**doc, "content_sha256": content_hash(doc)} if isinstance(doc, dict) else doc
    except (TypeError, ValueError):
        return doc


@st.composite
def file_mutation(draw, pristine: bytes, rehash: bool = False) -> bytes:
    """Structured (usually) or raw bytes; manifests optionally re-hashed so that the deeper checks run."""
    again = rehash and draw(st.booleans())
    if draw(st.integers(0, 3)):
        new = draw(json_mutations(json.loads(pristine)))
        return dump(rehashed(new) if again else new)
    data = draw(raw_mutation(pristine))
    try:
        return dump(rehashed(json.loads(data))) if again else data
    except (ValueError, RecursionError):
        return data


# ----------------------------------------------------------------------------------------------- the world


@dataclass(repr=False)
class World:
    profile: Path
    fragment: Path
    run: Path
    model: Any
    pristine: torch.nn.Module  # the base denoiser, put back after an accepted load
    base: tuple[dict, dict]  # (state, heads) of the base denoiser
    ref: tuple[dict, dict]  # (state, heads) after loading the pristine fragment

    def __repr__(self) -> str:
        return "World(tiny profile + fragment)"

    def restore(self) -> None:
        self.model.pipe.unet = copy.deepcopy(self.pristine)
        self.model.pipe._frag_fragment = None


def _state(den) -> tuple[dict, dict]:
    return {k: v.detach().clone() for k, v in den.state_dict().items()}, heads_per_module(den)


def same_state(den, want: tuple[dict, dict]) -> bool:
    now, state = den.state_dict(), want[0]
    return heads_per_module(den) == want[1] and now.keys() == state.keys() and all(
        now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("fuzz")
    prof = api.profile(PROMPT, model="tiny", seeds="0-1", steps=2, out=root / "profile", show_progress=False).out
    frag = api.extract(prof, {"head_retention": 0.6}, out=root / "fragment", show_progress=False).out
    run = api.generate(PROMPT, fragment=frag, model="tiny", seeds="0-0", steps=1, strict=True, out=root / "generate",
                       show_progress=False).out
    model = load_model("tiny")
    pristine, base = copy.deepcopy(model.denoiser), _state(model.denoiser)
    load_fragment(model, frag)
    w = World(prof, frag, run, model, pristine, base, _state(model.denoiser))
    w.restore()
    assert w.ref[1] != w.base[1] and same_state(model.denoiser, base)
    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:  # every pristine file is read
        assert check_load(w, frag) and all(r(Path(tmp) / n) for n, r in _record_files(w, Path(tmp)).items())
    return w


@contextmanager
def scratch(src: Path):
    """A private copy of the folder ``src``."""
    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:
        shutil.copytree(src, Path(tmp) / src.name)
        yield Path(tmp) / src.name


def accepted_or_refused(fn, *args, **kwargs) -> bool:
    """True when ``fn`` accepted the input, False when it refused it with a FragError; anything else fails."""
    try:
        fn(*args, **kwargs)
    except FragError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        verdict = "refused: " + " ".join(w for w in str(exc).split()[:4] if "/" not in w)
    else:
        verdict = "accepted"
    if currently_in_test_context():
        event(verdict)  # counted by --hypothesis-show-statistics
    return verdict == "accepted"


# ------------------------------------------------------------------------------------------------ manifest.json

PATHS = ["../fragment.safetensors", "/etc/passwd", "a\x00b", "x" * 300, "", ".", "sub/../fragment.safetensors",
         "./fragment.safetensors", "selection.json", "manifest.json", "a\\b", "~", "missing.safetensors", "\ud800"]
DENOISERS = ["vae", "text_encoder", "tokenizer", "scheduler", "config", "__class__", "", "unet.conv_in",
             "_frag_fragment"]


@st.composite
def manifest_change(draw, doc: dict) -> dict:
    """Targeted: head indices, the delta's key lists, the weights file, technique and base-model fields, artifact
    paths; else anything anywhere."""
    doc = copy.deepcopy(doc)
    t = doc["techniques"][0]
    removed = t["config"]["attention_heads_removed"]
    module = draw(st.sampled_from(sorted(removed)))
    index = st.integers(-3, 12) | st.sampled_from([2**63, "1", 1.0, 1.5, True, None, []])
    keys = sorted(doc["weights"]["changed"]) + ["unet.conv_in.weight", "unet.nope", "vae.x", "unet.", ""]
    other = draw(st.sampled_from(["nope", "", "down_blocks.0", "mid_block.attentions.0.transformer_blocks.0.attn2",
                                  module + ".to_q"]))
    targets = {
        ("techniques", 0, "config", "attention_heads_removed", module): st.lists(index, max_size=9) | st.sampled_from(
            [removed[module] * 2, removed[module][::-1], removed[module][:-1]]),
        ("techniques", 0, "config", "attention_heads_removed", other): st.just([0]),
        ("weights", draw(st.sampled_from(["changed", "added", "removed"]))): st.lists(st.sampled_from(keys), max_size=4),
        ("weights", "file"): st.sampled_from(PATHS),
        ("base_model", "denoiser"): st.sampled_from(DENOISERS),
        ("base_model", "hash"): st.just("0" * 64),
        ("techniques", 0, "name"): st.sampled_from(["HEAD_PRUNE", "toy_zero_channel", ""]),
        ("techniques", 0, "version"): st.sampled_from([0, -1, 2, 2**63]),
        ("techniques", 0, "config"): st.just({}),
        ("techniques",): st.sampled_from([[], [t, copy.deepcopy(t)]]),
        ("weights",): st.none(),
    }
    what = draw(st.sampled_from([*targets, "artifact", "anything", "anything", "anything"]))
    if what == "anything":
        return draw(json_mutations(doc))
    if what == "artifact":
        new, old = draw(st.sampled_from(PATHS)), draw(st.sampled_from(sorted(doc["artifacts"])))
        doc["artifacts"][new] = doc["artifacts"].pop(old)
        if old == doc["weights"]["file"] and draw(st.booleans()):
            doc["weights"]["file"] = new
        return doc
    _get(doc, what[:-1])[what[-1]] = draw(targets[what])
    return doc


def check_load(w: World, folder: Path) -> bool:
    """``load_fragment`` accepts with the pristine fragment's weights, or refuses and leaves the model alone."""
    den = w.model.denoiser
    ok = accepted_or_refused(load_fragment, w.model, folder)
    if ok:
        assert same_state(w.model.denoiser, w.ref), "accepted with different weights"
        w.restore()
    else:
        assert w.model.denoiser is den and not getattr(w.model.pipe, "_frag_fragment", None)
        assert same_state(den, w.base), "a refusal changed the model"
    return ok


@fuzz(80)
@given(data=st.data(), rehash=st.booleans())
def test_manifest_mutations_load_identically_or_are_refused(world, data, rehash):
    raw = (world.fragment / "manifest.json").read_bytes()
    if data.draw(st.integers(0, 3)) == 0:
        new = data.draw(file_mutation(raw, rehash=True))
    else:
        changed = data.draw(manifest_change(json.loads(raw)))
        new = dump(rehashed(changed) if rehash else changed)
    with scratch(world.fragment) as folder:
        (folder / "manifest.json").write_bytes(new)
        if check_load(world, folder):
            read_manifest(folder)  # then every other reader of the manifest accepts it too


@fuzz(15)
@given(data=st.data())
def test_damaged_safetensors_header_is_refused(world, data):
    """A damaged header or key (with its artifact hash re-recorded on purpose) is refused, never a crash."""
    raw = (world.fragment / "fragment.safetensors").read_bytes()
    i = data.draw(st.integers(0, 8 + int.from_bytes(raw[:8], "little") - 1))
    new = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:] if data.draw(st.booleans()) else raw[:i]
    with scratch(world.fragment) as folder:
        (folder / "fragment.safetensors").write_bytes(new)
        doc = json.loads((folder / "manifest.json").read_text())
        doc["artifacts"]["fragment.safetensors"] = {"sha256": hashlib.sha256(new).hexdigest(), "bytes": len(new)}
        (folder / "manifest.json").write_bytes(dump(rehashed(doc)))
        check_load(world, folder)


@pytest.mark.parametrize("path", ["a\x00b", "x" * 300, "d/" + "y" * 256, "\ud800"])
@pytest.mark.parametrize("field", ["artifact", "weights"])
def test_regression_odd_artifact_paths_are_refused(world, path, field):
    """Found by fuzzing: a NUL byte, an over-long name or a lone surrogate reached os.stat (ValueError/OSError)."""
    doc = json.loads((world.fragment / "manifest.json").read_text())
    if field == "artifact":
        doc["artifacts"][path] = doc["artifacts"].pop("selection.json")
    else:
        doc["weights"]["file"] = path
    with scratch(world.fragment) as folder:
        (folder / "manifest.json").write_bytes(dump(rehashed(doc)))
        assert not check_load(world, folder)


# ------------------------------------------------------------------------------------- the other JSON records


def _v1_bench(doc: dict) -> dict:
    """The same record as frag 0.1's bench.json (top-level full/fragment blocks), which read_bench migrates."""
    keep = ("total_s", "per_image_s", "repeats_total_s", "images_per_min", "weight_bytes", "activation_peak_bytes",
            "peak_bytes_est", "cuda_peak_bytes", "params")
    v1 = {k: v for k, v in doc.items() if k not in ("runs", "speedup_range", "peak_kind")}
    return {**v1, "schema_version": 1, **{n: {k: doc["runs"][n][k] for k in keep} for n in ("full", "fragment")}}


def _record_files(w: World, folder: Path) -> dict[str, Any]:
    """Pristine copies of every record, written into ``folder``: name -> its typed reader."""
    from tests.test_report import bench, validation

    v1 = ROOT / "tests" / "fixtures" / "v1_shapes_h80" / "fragment"
    shutil.copytree(v1, folder / "v1", ignore=shutil.ignore_patterns("selection.json"))
    for src in (w.fragment / "selection.json", w.profile / "context.json", w.run / "run.json"):
        shutil.copy(src, folder / src.name)
    b = bench().dump()
    for name, data in {"validation.json": validation(0.375).dump(), "bench.json": b, "bench-v1.json": _v1_bench(b)}.items():
        (folder / name).write_bytes(dump(data))
    return {
        "v1/manifest.json": lambda p: read_manifest(p.parent),
        "selection.json": lambda p: parse_record(HeadSelection, read_json(p, "selection"), p, "re-run frag extract"),
        "context.json": lambda p: read_context(p.parent),
        "run.json": lambda p: read_record(RunRecord, p),
        "validation.json": lambda p: read_record(ValidationRecord, p),
        "bench.json": read_bench,
        "bench-v1.json": read_bench,
    }


@pytest.mark.parametrize("name", ["v1/manifest.json", "selection.json", "context.json", "run.json", "validation.json",
                                  "bench.json", "bench-v1.json"])
@fuzz(40)
@given(data=st.data())
def test_record_mutations_are_read_or_refused(world, name, data):
    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:
        reader = _record_files(world, Path(tmp))[name]
        src = Path(tmp) / name
        src.write_bytes(data.draw(file_mutation(src.read_bytes())))
        accepted_or_refused(reader, src)


# ---------------------------------------------------------------------------------------------- thresholds.yaml

YAML_SPECIAL = ["!!python/object/apply:os.system [echo hi]", "a: &x [*x]", "ssim_min: &x {value: *x}",
                "ssim_min: 2020-01-01", "? [a]: 1", "ssim_min: .nan", "ssim_min: {value: .inf, direction: min}",
                "clip_delta_max: 1e999", "clip_delta_max: " + "9" * 5000, "\t", "---\na: 1\n---\nb: 2",
                "regression: {speedup_rel: -1}", "gate_hypotheses: [H1, H1]", "schema_version: 2",
                "gate_hypotheses: H1", "ssim_min: {value: 0.5, direction: max}", "ssim_min: 0x10",
                "ssim_min: !!binary aGk=", "ssim_min: !!set {a, b}", "1: 2", "null: 1", "regression: [1]",
                "ssim_min: {value: 0.5, direction: min, optional: maybe}", "~", "[]", "''", "ssim_min: [" * 3000]


@st.composite
def yaml_text(draw, pristine: str) -> bytes:
    kind = draw(st.sampled_from(["mutate", "mutate", "raw", "junk", "special"]))
    if kind in ("raw", "special"):
        return draw(raw_mutation(pristine.encode()) if kind == "raw" else st.sampled_from(YAML_SPECIAL).map(str.encode))
    doc = draw(JUNK) if kind == "junk" else draw(json_mutations(yaml.safe_load(pristine)))
    try:
        return yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode("utf-8", "surrogatepass")
    except yaml.YAMLError:
        return b"~"


@fuzz(80)
@given(text=yaml_text((ROOT / "thresholds.yaml").read_text(encoding="utf-8")))
@example(text=b"clip_delta_max: " + b"9" * 5000)  # regression: a 5000-digit int raised ValueError
@example(text=b"[" * 3000)  # regression: nesting deeper than the recursion limit raised RecursionError
def test_thresholds_mutations_load_or_are_refused(text):
    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:
        path = Path(tmp) / "thresholds.yaml"
        path.write_bytes(text)
        got: list = []
        if accepted_or_refused(lambda: got.append(load_thresholds(path))):
            assert isinstance(got[0], Thresholds) and all(math.isfinite(g.value) for g in got[0].gates().values())


# ------------------------------------------------------------------------------- profile.parquet, blocks.parquet

ODD_CELLS = [math.nan, math.inf, -math.inf, -1, 0, 1e308, None, 2**31 - 1, -(2**31), 99]


@st.composite
def table_mutation(draw, table: pa.Table) -> pa.Table:
    """Drop, rename (possibly to a duplicate) or retype a column, odd cells, no rows, an extra column."""
    import pyarrow.compute as pc

    names = table.column_names
    op = draw(st.sampled_from(["drop", "rename", "retype", "cells", "cells", "cells", "empty", "extra"]))
    col = draw(st.sampled_from(names))
    i, typ = names.index(col), table[col].type
    if op in ("drop", "empty", "extra"):
        return {"drop": lambda: table.remove_column(i), "empty": lambda: table.slice(0, 0),
                "extra": lambda: table.append_column(draw(COLUMN.filter(lambda k: k not in names)),
                                                     pa.array([0.0] * table.num_rows))}[op]()
    if op == "rename":
        return table.rename_columns([draw(st.sampled_from(names) | COLUMN) if n == col else n for n in names])
    if op == "retype":
        to = draw(st.sampled_from([pa.string(), pa.float32(), pa.float64(), pa.int64(), pa.int8(), pa.int32()]))
        try:
            return table.set_column(i, col, pc.cast(table[col], to, safe=False))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return table.set_column(i, col, pa.array([None] * table.num_rows, to))
    values = table[col].to_pylist()
    for row in draw(st.lists(st.integers(0, table.num_rows - 1), min_size=1, max_size=5)):
        values[row] = draw(st.sampled_from([None, "", "x", values[0] + ".x"] if pa.types.is_string(typ) else ODD_CELLS))
    try:
        return table.set_column(i, col, pa.array(values, typ))
    except (pa.ArrowInvalid, OverflowError, TypeError):
        return table.set_column(i, col, pa.array(values))  # an out-of-range value changes the type


def _write_table(path: Path, new: pa.Table | bytes) -> None:
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        pq.write_table(new, path)


@pytest.mark.parametrize("name", ["profile", "blocks"])
@fuzz(40)
@given(data=st.data())
def test_parquet_mutations_are_read_or_refused(world, name, data):
    """Typed readers (the planner's and the report's) accept a table, never with a NaN energy, or refuse it."""
    src = world.profile / f"{name}.parquet"
    new = data.draw(raw_mutation(src.read_bytes()) if data.draw(st.integers(0, 4)) == 0 else
                    table_mutation(pq.read_table(src)))
    with scratch(world.profile) as folder:
        _write_table(folder / f"{name}.parquet", new)
        if name == "blocks":
            accepted_or_refused(lambda: ProfileData(folder).table("blocks", BLOCK_TYPES))
            return
        cols: dict = {}
        if accepted_or_refused(lambda: cols.update(read_profile(folder))):
            for c in ("energy_pre", "energy_post"):
                assert np.isfinite(cols[c].astype(float)).all() and (cols[c] >= 0).all() and (cols[c] < 1e39).all()
            scores = score_heads(cols, "composite")  # a table that is read is scored, never with a NaN
            assert not any(np.isnan(v["score"]).any() or np.isnan(v["per_seed"]).any() for v in scores.values())
            accepted_or_refused(plan, scores, SelectionParams(head_retention=0.6))
        accepted_or_refused(head_importance, folder / "profile.parquet", None, None, {"name": "tiny", "hash": None})


def _column(table: pa.Table, name: str, values: list, typ=None) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values, typ))


DAMAGE = {
    "null heads": lambda t: _column(t, "heads", [None] * t.num_rows, pa.int32()),
    "null seed": lambda t: _column(t, "seed", [None] + t["seed"].to_pylist()[1:], pa.int64()),
    "missing row": lambda t: t.slice(1),
    "foreign seed": lambda t: _column(t, "seed", [99] + t["seed"].to_pylist()[1:], pa.int64()),
    "huge energy": lambda t: _column(t, "energy_post", [1e308] + t["energy_post"].to_pylist()[1:]),  # inf / inf
    "string energies": lambda t: _column(t, "energy_post", [str(x) for x in t["energy_post"].to_pylist()]),
    "huge heads": lambda t: _column(t, "heads", [10**12] * t.num_rows, pa.int64()),
}


@pytest.mark.parametrize("how", [*DAMAGE, "bad utf-8"])
def test_regression_damaged_profile_tables(world, how):
    """Nulls and missing rows passed read_profile and were scored as NaN (or crashed int()); nulls, string
    columns and absurd head counts crashed the report's head-importance reader (TypeError, Arrow, MemoryError);
    a string that is no longer UTF-8 crashed both (ArrowException)."""
    with scratch(world.profile) as folder:
        path = folder / "profile.parquet"
        if how == "bad utf-8":  # a flipped byte inside a string: the file still opens
            pq.write_table(pq.read_table(path), path, compression="none")
            raw = bytearray(path.read_bytes())
            raw[raw.index(b"mid_block")] = 0xFF
            path.write_bytes(bytes(raw))
        else:
            pq.write_table(DAMAGE[how](pq.read_table(path)), path)
        assert not accepted_or_refused(read_profile, folder)
        accepted_or_refused(head_importance, path, None, None, {"name": "tiny", "hash": None})


# ------------------------------------------------------------------------- context.json through frag extract


def _extract_leaves_nothing(folder: Path) -> bool:
    out = folder.parent / "out"
    if accepted_or_refused(api.extract, folder, {"head_retention": 0.6}, out=out, show_progress=False):
        read_manifest(out)
        return True
    # (a refusal after --out was locked leaves the lock file until the process ends: paths.release_held_locks)
    left = [p.name for p in folder.parent.iterdir() if p.name != folder.name and not p.name.endswith(".lock")]
    assert not left, f"a refusal left {left} behind"
    return False


@fuzz(12)
@given(data=st.data())
def test_context_mutations_extract_or_refuse_and_write_nothing(world, data):
    new = data.draw(json_mutations(json.loads((world.profile / "context.json").read_bytes())))
    with scratch(world.profile) as folder:
        (folder / "context.json").write_bytes(dump(new))
        _extract_leaves_nothing(folder)


@pytest.mark.parametrize("where", [("guidance",), ("timings", "total_s"), ("timesteps", 0)])
def test_regression_non_finite_context_numbers_are_refused_before_extract(world, where):
    """A NaN guidance or profiling time in context.json was copied into the manifest, whose canonical JSON cannot
    hold it: frag extract crashed with ValueError after pruning the model."""
    with scratch(world.profile) as folder:
        ctx = json.loads((folder / "context.json").read_text())
        _get(ctx, where[:-1])[where[-1]] = math.nan
        (folder / "context.json").write_bytes(dump(ctx))
        assert not _extract_leaves_nothing(folder)


# ------------------------------------------------------------------------------------ a run through frag report

REPORT_FILES = ["profile/context.json", "fragment/manifest.json", "fragment/selection.json",
                "validate/validation.json", "bench/bench.json", "profile/profile.parquet", "base/metrics_summary.json"]


def _report(run: Path, out: Path, compare: str = "none", draw: bool = False):
    from unittest import mock

    from fragcli.report.build import make_report

    if draw:
        return make_report(run, compare=compare, out=out)
    with mock.patch.multiple("fragcli.report.plots", head_usage=mock.DEFAULT, quality_vs_retention=mock.DEFAULT,
                             latency=mock.DEFAULT) as fakes:
        for fake in fakes.values():
            fake.return_value = None
        return make_report(run, compare=compare, out=out)


@fuzz(60)
@given(data=st.data())
def test_run_file_mutations_report_or_refuse(data):
    """One file of a run damaged: frag report (make_report) writes its report or refuses and writes nothing.
    Plots cost a second each, so about one example in ten draws them."""
    from tests.test_report import make_run

    name, draw = data.draw(st.sampled_from(REPORT_FILES)), data.draw(st.integers(0, 9)) == 0
    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:
        run, out = make_run(Path(tmp)), Path(tmp) / "report"
        compare = str(_report(run, run / "base").out) if name.startswith("base/") else "none"
        path = run / name
        if name.endswith(".parquet"):
            _write_table(path, data.draw(raw_mutation(path.read_bytes()) | table_mutation(pq.read_table(path))))
        else:
            path.write_bytes(data.draw(file_mutation(path.read_bytes(), rehash=name.endswith("manifest.json"))))
        if not accepted_or_refused(_report, run, out, compare, draw):
            assert not out.exists(), "a refused report left its folder"


# ---------------------------------------------------------------------------- regressions the fuzzing found


@pytest.mark.parametrize("text", [b"[" * 10_000, b'{"_type": ' + b"1" * 5000 + b"}"])
def test_regression_json_that_parses_only_into_an_exception_is_refused(world, text):
    """Nesting deeper than the recursion limit (RecursionError) and 5000-digit integers (ValueError) escaped every
    JSON reader."""
    from fragcli.report.diff import find_comparison

    with tempfile.TemporaryDirectory(prefix="frag-fuzz-") as tmp:
        folder = Path(tmp)
        for name, reader in _record_files(world, folder).items():
            (folder / name).write_bytes(text)
            assert not accepted_or_refused(reader, folder / name), name
        assert not accepted_or_refused(collect_run, folder)
        (folder / "manifest.json").write_bytes(text)
        assert not accepted_or_refused(read_manifest, folder)
        (folder / "metrics_summary.json").write_bytes(text)
        assert not accepted_or_refused(find_comparison, str(folder), {"name": "tiny"})


def test_regression_v1_bench_with_missing_or_odd_fields_is_refused(tmp_path):
    """frag 0.1 bench.json migration raised KeyError / TypeError / ValueError / ZeroDivisionError."""
    from tests.test_report import bench

    for damage in (lambda d: d.pop("full"), lambda d: d.pop("variants"), lambda d: d.update(variants=0),
                   lambda d: d["fragment"].update(repeats_total_s=7), lambda d: d["full"].update(repeats_total_s=["x"]),
                   lambda d: (d["fragment"].pop("repeats_total_s"), d["fragment"].pop("total_s"))):
        doc = _v1_bench(bench().dump())
        damage(doc)
        (tmp_path / "bench.json").write_bytes(dump(doc))
        assert not accepted_or_refused(read_bench, tmp_path / "bench.json")


def test_regression_v1_manifest_blocks_of_the_wrong_type_are_refused(tmp_path):
    """A frag 0.1 manifest whose params/quality/reuse/generation block is not an object crashed its migration."""
    src = ROOT / "tests" / "fixtures" / "v1_shapes_h80" / "fragment"
    for key, value in (("params", [1]), ("quality", 3), ("reuse", "x"), ("generation", "abc"), ("weight_bytes", 1)):
        folder = tmp_path / key
        shutil.copytree(src, folder)
        doc = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_bytes(dump({**doc, key: value}))
        assert not accepted_or_refused(read_manifest, folder), key
