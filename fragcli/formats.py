"""Render docs/FORMATS.md from the models that read and write each file (``python -m fragcli.formats``).

``python -m fragcli.formats`` prints the document; ``--write`` writes docs/FORMATS.md; ``--check`` exits 1 when
docs/FORMATS.md differs. The field tables come from the pydantic models (``fragcli.records``, ``fragcli.report.schema``,
the manifest, the head selection, the recipe, the bench record, every registered technique's config) and the Parquet
declarations (``fragcli.profiling.recorder`` and every registered technique's ``collectors()``); the prose is below.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMATS.md"

INTRO = """\
# frag file formats (stages talk only through these files)

<!-- Generated from the models by `python -m fragcli.formats --write`; edit fragcli/formats.py or the models. -->

All JSON is written atomically (temp file + rename) with sorted keys, as UTF-8. Every top-level JSON object has
`_type` and `schema_version` (an integer, per file). Each file is read back through its model: a file that is
malformed, has a field of the wrong type, a missing field, an unknown key, or a schema_version this frag does not
read is refused with a one-line error naming the file and the field (a version-1 manifest is migrated in memory).
A number that could not be measured is `null`, never a made-up value, and the reason is recorded beside it
(`unavailable`).

Types below: `string`, `int`, `number`, `bool`, `null`; `[T]` is a list, `{K: V}` an object, `A | B` either,
`"x"` exactly that value, and a name is a nested object described in its own table (once, where first used).
"required" marks a field without a default.
"""

PROFILE = """\
## Profile folder (`frag profile`, default `reports/<model>/<timestamp>/profile/`)

- `images/seed-<n>.png`: the full model's images (the baseline that `frag validate --profile` reuses).
- One Parquet table per profile signal, one row per recorded value. Column types are pyarrow types.
"""

HEAD_DOCS = {
    "module": "dotted name of the diffusers `Attention` module inside the denoiser, e.g. "
              "`down_blocks.0.attentions.0.transformer_blocks.0.attn1`",
    "block": "the enclosing top-level block, e.g. `down_blocks.0`",
    "kind": "`self` | `cross` | `joint` (image and context tokens attend together: SD3, Flux)",
    "head": "head index in the module, 0-based",
    "heads": "heads in that module",
    "seed": "generation seed",
    "step": "index in the schedule, 0-based",
    "timestep": "the scheduler's timestep at that step",
    "energy_pre": "RMS of the head's output before `to_out`, over batch x tokens x head_dim",
    "energy_post": "RMS of the head's contribution after `to_out[0]` without bias, over batch x tokens x out_dim",
    "entropy": "attention entropy normalised by log(keys), mean over sampled query rows and batch; NaN when the "
               "module's processor could not be profiled for entropy",
}
BLOCK_DOCS = {
    "block": "block name (top-level blocks and their resnets / transformers)",
    "block_type": "resnet | transformer | transformer_block | down | mid | up",
    "seed": "generation seed",
    "step": "index in the schedule, 0-based",
    "timestep": "the scheduler's timestep at that step",
    "rel_update": "||out-in||/||in|| when shapes match, else RMS of the output",
    "cos_prev": "cosine similarity with this block's output at the previous step; NaN at step 0",
}

FRAGMENT = """\
## Fragment folder (`frag extract`, default `fragments/<name>/`)

- `fragment.safetensors`: the tensors that differ from the base denoiser (changed or added; the manifest's
  `weights` lists them and the removed keys), keys prefixed by component (`unet.down_blocks...to_q.weight`), dtype
  preserved. A runtime-only fragment (e.g. a step schedule) has none (`weights: null`).
- `selection.json`: the head-pruning plan, written beside the manifest when head pruning is planned.
- `manifest.json`: the fragment, layer by layer: base model, profiling context, the ordered `techniques` (each
  with its versioned config and its summary), the weight delta, quality and reuse (filled by `frag validate`),
  performance (filled by `frag bench`), costs, and the SHA-256 of every artifact. No absolute path is stored.
"""

RECIPE = """\
## Recipe (`frag extract --objective memory|speed|balanced`, writes `recipe.json` and `recipe.png` in the fragment)

The candidates the search tried (`fragcli.recipe`: each an extract options dict, applied to a copy of the denoiser
and generated on a few of the profile's seeds), their status, size, speed and quality against the profile's
full-model images, the gates used, and the one built (`chosen`; null: none passed, and no fragment is written).
`recipe.png`: resident MiB and seconds per image against the quality loss, passing and failing candidates, the
Pareto fronts, the chosen one labelled.
"""

VALIDATION = """\
## Validation (`frag validate`, writes `validation.json` and `grid.png` in its --out folder)

`clip_delta_rel` = (clip_fragment - clip_full) / |clip_full| (negative = the fragment scores lower).
`grid.png`: one row per seed: full | fragment | |difference| x4.
"""

SWEEP = """\
## Sweep (`frag sweep`, writes one `<point>/fragment` and `<point>/validate` per value, and `sweep.json`)

`frag report --sweep DIR` reads the points' `validation.json` files (H1, `quality_vs_retention.png`).
"""

BENCH = """\
## Benchmark (`frag bench`, writes `bench.json` in its --out folder)

Every contender in `runs` ran in one process, interleaved (ABBA); its numbers are medians over the repeats.
"""

OUTPUT = """\
## Every output folder: the marker (`.frag-output.json`)

Every folder a command writes is built beside its target and swapped in whole; its marker lists every file frag
wrote there, at any depth, with its SHA-256 and size, and every folder it created. `--overwrite` replaces a folder
only when everything in it is on that list and unchanged (`fragcli.outputs`); frag updates the list when it
rewrites one of its own files in place (the quality and performance blocks of a fragment's manifest).
"""

RUN = """\
## Generation (`frag generate`, writes `seed-<n>.png` and `run.json` in its --out folder)
"""

LIBRARY = """\
## Fragment library (`$FRAG_HOME/.frag/library.sqlite`, `$FRAG_HOME/config.yaml`; `frag cache`)

SQLite (WAL journal): table `fragments`, one row per fragment folder (below; `embedding` is a little-endian float32
blob, `techniques`/`quality`/`performance` JSON text), table `prompts` (model_hash, prompt_norm, embedding: the
embeddings of prompts looked up), table `counters` (`hits`, `misses` of `--fragment auto`).
"""

REPORT = """\
## Report folder (`frag report`, default `reports/<model>/<timestamp>/`)

Besides the JSON files below: copies of `profile.parquet` and `blocks.parquet`, and the plots `head_usage.png`,
`quality_vs_retention.png` (quality against the fraction of each unit the techniques removed) and `latency.png`
(each drawn only from measured data; a note says why one is missing). `regression_diff.json` compares the
`metrics` of this report with an earlier one's (of any schema_version): a metric missing on either side is MISSING
and does not gate.
"""


GENERIC = {"_type": "what the file is; a reader skips or refuses a file of another type",
           "schema_version": "this layout's version; readers refuse versions they do not read"}

# ----------------------------------------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


class Renderer:
    """Renders models as Markdown tables; each nested model once, where first used."""

    def __init__(self) -> None:
        self.done: set[type] = set()
        self.names: dict[str, type] = {}

    def name(self, cls: type) -> str:
        taken = self.names.setdefault(cls.__name__, cls)
        if taken is cls:
            return cls.__name__
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    def type_name(self, tp: Any) -> str:
        origin, args = get_origin(tp), get_args(tp)
        if tp is type(None):
            return "null"
        if tp is Any:
            return "any"
        if origin in (Union, types.UnionType):
            return " | ".join(self.type_name(a) for a in args)
        if origin is Literal:
            return " | ".join(json.dumps(a) for a in args)
        if origin in (list, set, frozenset) or origin is typing.Sequence:
            return f"[{self.type_name(args[0]) if args else 'any'}]"
        if origin is tuple:
            return "[" + ", ".join(self.type_name(a) for a in args if a is not Ellipsis) + "]"
        if origin is dict:
            return f"{{{self.type_name(args[0])}: {self.type_name(args[1])}}}" if args else "{string: any}"
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self.name(tp)
        return {str: "string", int: "int", float: "number", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))

    def nested(self, tp: Any) -> list[type]:
        """The models inside an annotation, in order."""
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [tp]
        return [m for a in get_args(tp) for m in self.nested(a)]

    @staticmethod
    def default(field) -> str:
        if field.is_required():
            return "required"
        value = field.default_factory() if field.default_factory is not None else field.default
        if value is PydanticUndefined:
            return "required"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        text = json.dumps(value, default=str)
        return f"`{text}`" if len(text) <= 40 else "(see the model)"

    def model(self, cls: type[BaseModel], title: str | None = None, level: int = 3) -> str:
        """``cls`` and every model nested in it that has not been rendered yet."""
        self.done.add(cls)
        heading = title or f"`{self.name(cls)}`"
        lines = [f"{'#' * level} {heading}", ""]
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(("A base class", "Usage docs")):
            lines += [" ".join(doc.split()), ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        todo: list[type] = []
        for name, field in cls.model_fields.items():
            key = field.alias or name
            about = field.description or GENERIC.get(key, "")
            lines.append(f"| `{key}` | `{_cell(self.type_name(field.annotation))}` | {_cell(self.default(field))} | "
                         f"{_cell(about)} |")
            todo += [m for m in self.nested(field.annotation) if m not in self.done and m not in todo]
        out = "\n".join(lines) + "\n"
        for m in todo:
            if m not in self.done:
                out += "\n" + self.model(m, level=4)
        return out


def table(name: str, columns: list[tuple[str, str]], docs: dict[str, str], what: str) -> str:
    lines = [f"### `{name}.parquet`", "", what, "", "| column | type | description |", "|---|---|---|"]
    lines += [f"| `{c}` | `{t}` | {_cell(docs.get(c, ''))} |" for c, t in columns]
    return "\n".join(lines) + "\n"


def _file(name: str, cls: type[BaseModel]) -> str:
    fields = cls.model_fields
    type_ = fields["type_"].default if "type_" in fields else None
    version = fields["schema_version"].default if "schema_version" in fields else None
    tail = f" (`_type: {type_}`, schema_version {version})" if type_ else ""
    return f"`{name}`{tail}: `{cls.__name__}`"


def render() -> str:
    """The whole of docs/FORMATS.md."""
    from fragcli.bench import BenchRecord
    from fragcli.library import Entry
    from fragcli.library_disk import LibraryConfig
    from fragcli.manifest import Manifest
    from fragcli.outputs import OutputMarker
    from fragcli.profiling.recorder import BLOCK_TABLE, BLOCK_TYPES, HEAD_TABLE, HEAD_TYPES
    from fragcli.recipe import RecipeRecord
    from fragcli.records import ProfileContext, RunRecord, ValidationRecord
    from fragcli.report.schema import HeadImportance, RegressionDiff, ReportSummary
    from fragcli.sweep import SweepRecord
    from fragcli.techniques import REGISTRY
    from fragcli.techniques.head_selection import HeadSelection

    r = Renderer()
    parts = [INTRO, OUTPUT, r.model(OutputMarker, _file(".frag-output.json", OutputMarker)), PROFILE,
             table(HEAD_TABLE, list(HEAD_TYPES.items()), HEAD_DOCS, "One row per (module, head, seed, step)."),
             table(BLOCK_TABLE, list(BLOCK_TYPES.items()), BLOCK_DOCS, "One row per (block, seed, step).")]
    for technique in REGISTRY:
        for c in technique.collectors():
            parts.append(table(c.table, list(c.columns), c.docs,
                               f"Declared by the technique `{technique.name}` (collector `{c.name}`)."))
    parts += [r.model(ProfileContext, _file("context.json", ProfileContext)), FRAGMENT,
              r.model(HeadSelection, _file("selection.json", HeadSelection)),
              r.model(Manifest, _file("manifest.json", Manifest))]
    parts += [r.model(cls, _file(f, cls) + f", written by the technique `{t.name}`")
              for t in REGISTRY for f, cls in t.records.items()]
    configs = "\n".join(r.model(t.Config, f"`{t.name}` config (version {t.version}): `{t.Config.__name__}`", 4)
                        for t in REGISTRY)
    parts += ["### Technique configs (`techniques[].config`)\n\nOne per registered technique, in registration "
              "order.\n\n" + configs,
              VALIDATION, r.model(ValidationRecord, _file("validation.json", ValidationRecord)),
              RECIPE, r.model(RecipeRecord, _file("recipe.json", RecipeRecord)),
              SWEEP, r.model(SweepRecord, _file("sweep.json", SweepRecord)),
              BENCH, r.model(BenchRecord, _file("bench.json", BenchRecord)),
              RUN, r.model(RunRecord, _file("run.json", RunRecord)),
              LIBRARY, r.model(Entry, "a row of `fragments`: `Entry`"),
              r.model(LibraryConfig, _file("config.yaml", LibraryConfig)),
              REPORT, r.model(ReportSummary, _file("metrics_summary.json", ReportSummary)),
              r.model(RegressionDiff, _file("regression_diff.json", RegressionDiff)),
              r.model(HeadImportance, _file("head_importance.json", HeadImportance))]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fragcli.formats", description="Print docs/FORMATS.md, generated "
                                 "from the models.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC} differs from the generated text")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        from fragcli.paths import atomic_write_text

        atomic_write_text(DOC, text)
        print(f"wrote {DOC}", file=sys.stderr)
    elif args.check:
        same = DOC.is_file() and DOC.read_text(encoding="utf-8") == text
        if not same:
            print(f"{DOC} is out of date: run python -m fragcli.formats --write", file=sys.stderr)
        return 0 if same else 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
