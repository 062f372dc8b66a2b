"""frag as a library: one function per stage, each returning its typed record; the CLI only parses and prints.

>>> from fragcli import api
>>> prof = api.profile("a red circle on a blue background", model="tiny", seeds=4, out="runs/red/profile")
>>> frag = api.extract(prof.out, {"head_retention": 0.7}, out="runs/red/fragment")
>>> api.validate(frag.out, seeds=8, profile=prof.out, out="runs/red/validate").record["passed"]
>>> api.bench(frag.out, variants=8, out="runs/red/bench").record.speedup
>>> api.sweep(prof.out, [0.9, 0.7], seeds=4, out="runs/red/sweep").record.points[0].aggregate
>>> api.report("runs/red", sweeps=["runs/red/sweep"]).summary["hypotheses"]

Library calls change no process-wide state (warnings filters, torch threads, library log levels): the ``frag``
command sets those once at start-up (``fragcli.cli.app``). Every bad input is a ``FragError``; nothing is written
before the inputs are checked, and every output folder is swapped in whole (``--overwrite`` replaces it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragcli.bench import BenchRecord
from fragcli.extraction import ExtractResult, extract
from fragcli.report import ReportResult
from fragcli.sweep import SweepRecord

__all__ = ["BenchResult", "ExtractResult", "GenerateResult", "ProfileResult", "ReportResult", "SweepResult",
           "ValidateResult", "bench", "extract", "generate", "profile", "report", "sweep", "validate"]

Seeds = str | int | Sequence[int]


def _seeds(seeds: Seeds) -> list[int]:
    from fragcli.seeds import parse_seeds

    if isinstance(seeds, (str, int)):
        return parse_seeds(seeds)
    listed = [int(s) for s in seeds]
    if len(listed) == 1:  # "5" alone would mean five seeds: one seed is the range 5-5
        return parse_seeds(f"{listed[0]}-{listed[0]}")
    return parse_seeds(",".join(map(str, listed)))


def _model(model: str | None) -> str | None:
    """``--model`` as typed: None (the default model) or a non-empty spec."""
    if model is not None and not str(model).strip():
        from fragcli.errors import FragError

        raise FragError("--model is empty", "pass a model (e.g. --model tiny), or leave --model out for the default")
    return model


def _default_out(model_name: str, stage: str) -> Path:
    from fragcli.paths import reports_dir, safe_name, timestamp

    return reports_dir() / safe_name(model_name) / timestamp() / stage


@contextlib.contextmanager
def _updating(fragment_dir: Path, update: bool = True) -> Iterator[None]:
    """Hold a fragment folder whose manifest this command updates at its end (validate's quality block, bench's
    performance block): a second writer (``extract --overwrite`` into it, another validate or bench) is refused
    instead of one losing the other's update or a block landing on a different fragment. A folder that cannot be
    locked (a read-only place) is used unlocked, as before."""
    from fragcli.errors import FragError
    from fragcli.paths import OutputLocked, acquire_lock, release_lock

    locked = False
    if update:
        try:
            acquire_lock(Path(fragment_dir), "wait for it to finish, then retry")
            locked = True
        except OutputLocked:
            raise
        except FragError:
            pass
    try:
        yield
    finally:
        if locked:
            release_lock(Path(fragment_dir))


def _typed(cls_name: str, data: Any):
    """``data`` as its ``fragcli.records`` model (validated), whether it is already one or its JSON dict."""
    from fragcli import records

    cls = getattr(records, cls_name)
    return data if isinstance(data, cls) else cls.model_validate(data)


@dataclass
class ProfileResult:
    out: Path
    context: dict[str, Any]  # context.json (frag.profile)

    def typed(self):
        """context.json as ``fragcli.records.ProfileContext``."""
        return _typed("ProfileContext", self.context)

    def summary(self) -> dict[str, Any]:
        c = self.context
        return {"out": str(self.out), "model": c["model"], "rows": c["rows"], "seeds": c["seeds"],
                "profiled_steps": c["profiled_steps"], "timings": c["timings"]}


def profile(prompt: str, *, model: str | None = None, seeds: Seeds = 8, steps: int | None = None,
            profile_steps: int | None = None, step_spacing: str = "uniform", exact_entropy: bool = False,
            guidance: float | None = None, negative_prompt: str = "", width: int | None = None,
            height: int | None = None, device: str = "auto", dtype: str = "auto", out: Path | None = None,
            overwrite: bool = False, show_progress: bool = True) -> ProfileResult:
    """Generate with the full model while recording per-head and per-block statistics (``frag profile``)."""
    from fragcli.generation import check_options, check_prompt, resolve_settings
    from fragcli.models import default_model, load_model
    from fragcli.outputs import command_inputs
    from fragcli.paths import check_out_dir
    from fragcli.profiling.run import run_profile
    from fragcli.seeds import pick_steps

    check_prompt(prompt)
    seed_list = _seeds(seeds)
    check_options(steps, guidance, width, height)
    name = _model(model) or default_model()
    target = check_out_dir(Path(out) if out else _default_out(name, "profile"), overwrite,
                           inputs=command_inputs(model=name))
    loaded = load_model(name, device, dtype)
    settings = resolve_settings(loaded, prompt, steps, guidance, width, height, negative_prompt)
    chosen = pick_steps(settings.steps, profile_steps, step_spacing)
    ctx = run_profile(loaded, settings, seed_list, chosen, target, exact_entropy, show_progress=show_progress)
    return ProfileResult(target, ctx)


@dataclass
class ValidateResult:
    out: Path
    record: dict[str, Any]  # validation.json (frag.validation)

    def typed(self):
        """validation.json as ``fragcli.records.ValidationRecord``."""
        return _typed("ValidationRecord", self.record)

    def summary(self) -> dict[str, Any]:
        rec = self.record
        return {"out": str(self.out), "passed": rec["passed"], "aggregate": rec["aggregate"],
                "unavailable": rec["unavailable"],
                "reuse_pass_rate": rec["paraphrases"]["pass_rate"] if rec["paraphrases"] else None}


def validate(fragment_dir: Path, *, seeds: Seeds = 20, paraphrases: Path | Sequence[str] | None = None,
             paraphrase_seeds: int = 2, simulate: bool = False, clip_model: str | None = None,
             clip_weights: Path | None = None, lpips_weights: Path | None = None, thresholds: Path | None = None,
             profile: Path | None = None, model: str | None = None, device: str = "auto", dtype: str = "auto",
             out: Path | None = None, overwrite: bool = False, show_progress: bool = True) -> ValidateResult:
    """The fragment against its full model on the same seeds, gated by thresholds (``frag validate``): writes
    validation.json and grid.png into ``out`` and the quality/reuse blocks of the fragment's manifest."""
    from fragcli.manifest import read_manifest
    from fragcli.outputs import command_inputs
    from fragcli.paths import check_out_dir

    manifest = read_manifest(Path(fragment_dir))
    run = _prepare_validation(fragment_dir, manifest, seeds, paraphrases, paraphrase_seeds, simulate, clip_model,
                              clip_weights, lpips_weights, thresholds, profile, model, device, dtype, show_progress)
    files = [paraphrases] if isinstance(paraphrases, (str, Path)) else []
    target = check_out_dir(Path(out) if out else _default_out(manifest.base_model.name, "validate"), overwrite,
                           inputs=command_inputs(fragment_dir, profile, thresholds, clip_weights, lpips_weights,
                                                 *files, model=model or manifest.base_model.spec))
    with _updating(Path(fragment_dir), update=not simulate):
        return run(target, None)


def _prepare_validation(fragment_dir, manifest, seeds, paraphrases, paraphrase_seeds, simulate, clip_model,
                        clip_weights, lpips_weights, thresholds, profile, model, device, dtype,
                        show_progress) -> Callable[[Path, Path | None], ValidateResult]:
    """Check the inputs (seeds, paraphrases) now; return ``run(target, recorded_fragment)``, which validates and
    writes. ``recorded_fragment``: the path validation.json names (the sweep builds in a staging folder)."""
    from fragcli.paraphrases import default_paraphrases, read_paraphrases
    from fragcli.validation import ValidateOptions, validate_fragment, write_validation

    seed_list = _seeds(seeds)
    _model(model)
    if profile is not None:  # a --profile that is no profile folder is refused, not silently ignored
        from fragcli.paths import read_json

        read_json(Path(profile) / "context.json", "--profile: profile context")
    if isinstance(paraphrases, (str, Path)):
        para = read_paraphrases(Path(paraphrases))
    else:
        para = list(paraphrases) if paraphrases is not None else None
    reason = None
    if para is None:
        para, reason = default_paraphrases(manifest.base_model.name, manifest.profiling.prompt)
    opts = ValidateOptions(seed_list, para, paraphrase_seeds, simulate, model, device, dtype, clip_model, clip_weights,
                           lpips_weights, thresholds, profile, show_progress=show_progress)

    def run(target: Path, recorded_fragment: Path | None) -> ValidateResult:
        result = validate_fragment(Path(fragment_dir), opts)
        rec = result["record"]
        if reason:
            rec["unavailable"]["paraphrases"] = reason
        if recorded_fragment is not None:
            rec["fragment"] = str(Path(recorded_fragment).resolve())
        write_validation(result, target, Path(fragment_dir))
        return ValidateResult(target, rec)

    return run


@dataclass
class GenerateResult:
    out: Path
    run: dict[str, Any]  # run.json (frag.run)

    def typed(self):
        """run.json as ``fragcli.records.RunRecord``."""
        return _typed("RunRecord", self.run)

    def summary(self) -> dict[str, Any]:
        keys = ("out", "model", "fragment", "fallback_reason", "images_per_min", "total_s", "library")
        return {k: self.run.get(k) for k in keys}


def generate(prompt: str, *, fragment: str | Path | None = None, strict: bool = False, model: str | None = None,
             seeds: Seeds = 8, steps: int | None = None, guidance: float | None = None, negative_prompt: str = "",
             width: int | None = None, height: int | None = None, batch_size: int = 1, device: str = "auto",
             dtype: str = "auto", out: Path | None = None, overwrite: bool = False, show_progress: bool = True,
             on_fallback: Callable[[str], None] | None = None,
             evict_text_encoders: bool | None = None, min_similarity: float | None = None) -> GenerateResult:
    """One image per seed, with ``fragment`` (a folder or 'auto') when it is accepted, else the full model
    (``on_fallback(reason)`` is called; with ``strict`` the refusal is raised instead). Writes PNGs + run.json.
    ``evict_text_encoders``: None = the fragment's default (see ``frag extract --evict-text-encoders``).
    ``min_similarity``: 'auto' picks from the fragment library by prompt similarity (``fragcli.library``); None =
    thresholds.yaml's ``fragment_min_similarity``."""
    from fragcli.generation import check_options, check_prompt
    from fragcli.models import default_model
    from fragcli.outputs import command_inputs
    from fragcli.paths import check_out_dir
    from fragcli.runs import resolve_auto, run_generation

    check_prompt(prompt)
    check_options(steps, guidance, width, height)
    seed_list = _seeds(seeds)
    if min_similarity is not None and not -1.0 <= min_similarity <= 1.0:
        from fragcli.errors import FragError

        raise FragError(f"--min-similarity {min_similarity:g} is outside [-1, 1]", "pass a cosine similarity, e.g. 0.9")
    fragment = str(fragment) if fragment is not None else None
    if fragment is not None and not fragment.strip():
        from fragcli.errors import FragError

        raise FragError("--fragment is empty", "pass a fragment folder or auto, or leave --fragment out")
    name = _model(model) or _fragment_model(fragment) or default_model()
    inputs = [fragment] if fragment and fragment != "auto" else []
    if fragment == "auto":  # what it may resolve to is an input too (the library decides once the model is loaded)
        _exact, inputs = resolve_auto(name, prompt)
    target = check_out_dir(Path(out) if out else _default_out(name, "generate"), overwrite,
                           inputs=command_inputs(*inputs, model=name))
    run = run_generation(name, prompt, fragment, seed_list, target, steps=steps, guidance=guidance,
                         negative_prompt=negative_prompt, width=width, height=height, batch_size=batch_size,
                         device=device, dtype=dtype, strict=strict, show_progress=show_progress,
                         on_fallback=on_fallback, evict_text_encoders=evict_text_encoders,
                         min_similarity=min_similarity)
    return GenerateResult(target, run)


def _fragment_model(fragment: str | None) -> str | None:
    """With a fragment folder and no model, use the fragment's base model."""
    if not fragment or fragment == "auto":
        return None
    from fragcli.errors import FragError
    from fragcli.manifest import read_manifest

    try:
        return read_manifest(Path(fragment)).base_model.spec
    except FragError:
        return None  # refused later, with the reason, by the fallback logic


@dataclass
class BenchResult:
    out: Path  # the folder holding bench.json
    record: BenchRecord

    @property
    def path(self) -> Path:
        return self.out / "bench.json"


def bench(fragment_dir: Path, *, variants: int = 32, batch_size: int = 1, repeats: int = 3, steps: int | None = None,
          model: str | None = None, device: str = "auto", dtype: str = "auto", out: Path | None = None,
          overwrite: bool = False, manifest: bool = True, show_progress: bool = True, memory: bool = True,
          memory_repeats: int = 1, decode: str = "plain", peers: str | None = None,
          fidelity: bool = True) -> BenchResult:
    """The full model and the fragment side by side in one process, interleaved (``frag bench``): writes
    ``out``/bench.json and, unless ``manifest=False``, the manifest's performance block. ``memory``: each side's
    load / generation / decode peaks measured first in a fresh process (``memory_repeats`` runs per side);
    ``decode``: the fragment side's VAE decode (plain | tiled | sliced | auto); ``peers``: e.g. "deepcache,tgate"
    (``fragcli.peers``), each installed one run beside them; ``fidelity``: every contender's images against the
    full model's."""
    from fragcli.bench import check_bench_args, run_bench, write_bench
    from fragcli.manifest import read_manifest
    from fragcli.outputs import command_inputs
    from fragcli.paths import check_out_dir
    from fragcli.peers import resolve_peers

    check_bench_args(variants, batch_size, repeats, steps, memory=memory, memory_repeats=memory_repeats, decode=decode)
    _model(model)
    resolve_peers(peers)  # an unknown name is refused before anything runs
    m = read_manifest(Path(fragment_dir))
    target = check_out_dir(Path(out) if out else _default_out(m.base_model.name, "bench"), overwrite,
                           inputs=command_inputs(fragment_dir, model=model or m.base_model.spec))
    with _updating(Path(fragment_dir), update=manifest):
        record = run_bench(Path(fragment_dir), variants, batch_size, repeats, model, device, dtype, steps,
                           show_progress, memory=memory, memory_repeats=memory_repeats, decode=decode, peers=peers,
                           fidelity=fidelity)
        write_bench(record, target, Path(fragment_dir) if manifest else None)
    return BenchResult(target, record)


@dataclass
class SweepResult:
    out: Path
    record: SweepRecord


def sweep(profile_dir: Path, values: Sequence[float], *, option: str = "head_retention",
          options: dict[str, Any] | None = None, seeds: Seeds = 4, paraphrases: Path | Sequence[str] | None = None,
          paraphrase_seeds: int = 2, thresholds: Path | None = None, model: str | None = None, device: str = "auto",
          dtype: str = "auto", out: Path | None = None, overwrite: bool = False,
          show_progress: bool = True) -> SweepResult:
    """Extract and validate at each value of one extract option (``frag sweep``): ``out``/<point>/fragment,
    ``out``/<point>/validate and ``out``/sweep.json. ``options`` are the other extract options, fixed."""
    from fragcli.sweep import run_sweep

    _model(model)
    target, record = run_sweep(Path(profile_dir), list(values), option=option, options=options or {}, seeds=seeds,
                               paraphrases=paraphrases, paraphrase_seeds=paraphrase_seeds, thresholds=thresholds,
                               model=model, device=device, dtype=dtype, out=out, overwrite=overwrite,
                               show_progress=show_progress)
    return SweepResult(target, record)


def report(run: Path, *, compare: str = "latest", gate: Path | None = None, sweeps: Sequence[Path] = (),
           out: Path | None = None, overwrite: bool = False) -> ReportResult:
    """Score hypotheses H1-H5, check gates and regressions, write the report folder (``frag report``)."""
    from fragcli.errors import FragError
    from fragcli.report import make_report

    root = Path(run).expanduser().resolve()
    if root == Path(root.anchor):
        raise FragError(f"--run {run} is the filesystem root", "pass the folder frag profile/extract/validate/bench "
                        "wrote into")
    return make_report(Path(run), compare=compare, gate=gate, out=out, sweeps=[Path(s) for s in sweeps],
                       overwrite=overwrite)
