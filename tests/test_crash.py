"""Crash safety and concurrency of frag's outputs, with real processes: nothing lost, nothing half-written.

Every frag process here is a separate OS process running the ``frag`` command (``fragcli.cli.app:app``), killed
for real: at named points by the test hook ``FRAG_TEST_CRASH_AT`` (``fragcli.paths.crash_point``: ``os._exit(137)``,
no clean-up, as ``kill -9``) or by SIGKILL after a random delay. Importing torch and diffusers costs ~10 s a process
on a 2-core machine, so by default the processes are forked from one warmed-up server (``_zygote``: it imports frag,
runs the commands once, which also builds the shared profile, fragment and report, and then forks one child per
command). ``pytest -m slow tests/test_crash.py`` runs the same tests with ``.venv/bin/frag`` executables instead.

After each kill the target is checked: the previous output byte for byte, or the new one whole (the marker lists
exactly what is there, the record parses, a fragment verifies), or absent with the previous copy hidden beside it,
which the next run restores and says so; no JSON file anywhere is torn; staging folders, temp files and locks of the
dead process are gone after the next run.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from fragcli.paths import MARKER

ROOT = Path(__file__).resolve().parents[1]
FRAG = Path(sys.executable).with_name("frag")
if not FRAG.exists():
    FRAG = Path(shutil.which("frag") or FRAG)
PROMPT = "a red circle"
TINY = ["-m", "tiny", "--seeds", "1", "--steps", "1"]
TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # frag's temp files and staging folders: .<name>.<pid>.<x>.tmp
START = time.perf_counter()
WAIT_S = 240  # per process: generous, a shared CI machine can be slow; a hang fails instead of blocking CI


# --------------------------------------------------------------------------------------------------------------
# The fork server: one warmed-up process that forks a child per frag command (runs in its own process, never in
# pytest's). Requests and replies are JSON lines on its stdin and on a copy of its stdout.


def _zygote() -> None:  # pragma: no cover - runs in the server process
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever frag prints while warming up goes to the server's log, not into the protocol
    sys.stdout = os.fdopen(1, "w", buffering=1)
    config = json.loads(sys.stdin.readline())
    os.environ.update(config["env"])
    os.chdir(config["cwd"])
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread: the server must be single-threaded when it forks
    from fragcli.cli.app import app

    warm, seconds = [], [time.perf_counter() - START]
    for argv in config["warm"]:  # the shared outputs, and every code path imported and run once before forking
        try:
            app(argv, prog_name="frag", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        warm.append(code)
        seconds.append(time.perf_counter() - START)
    proto.write(json.dumps({"ready": warm, "seconds": seconds, "threads": [t.name for t in threading.enumerate()]})
                + "\n")
    children: dict[int, int] = {}
    stdin = sys.stdin.fileno()
    buf = b""
    while True:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            proto.write(json.dumps({"id": children.pop(pid), "rc": rc}) + "\n")
        ready, _, _ = select.select([stdin], [], [], 0.02)
        if not ready:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, proto)
            children[pid] = req["id"]
            proto.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
    for pid in list(children):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    proto.flush()
    os._exit(0)  # no interpreter shutdown (seconds, with torch loaded)


def _child(req: dict, proto) -> None:  # pragma: no cover - runs in a forked child
    code = 1
    try:
        proto.close()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        if req.get("call"):
            globals()[req["call"]](*req["args"])
            code = 0
        else:
            from fragcli.cli.app import app

            app(req["argv"], prog_name="frag", standalone_mode=True)
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Proc:
    """One frag process: its pid, exit code (negative: killed by that signal), stdout and stderr."""

    def __init__(self, runner, key: int, stdout: Path, stderr: Path):
        self.runner, self.key, self.stdout_path, self.stderr_path = runner, key, stdout, stderr
        self.rc: int | None = None
        self.pid: int = 0

    def wait(self, timeout: float = WAIT_S) -> int:
        self.rc = self.runner.wait(self, timeout)
        return self.rc

    def kill(self) -> None:
        if self.runner.poll(self) is None:
            with_suppress(os.kill, self.pid, signal.SIGKILL)

    @property
    def out(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def __repr__(self):
        return f"<frag pid {self.pid} rc {self.rc}>\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def with_suppress(func, *args):
    try:
        func(*args)
    except (OSError, subprocess.SubprocessError):
        pass


class Runner:
    kind = "?"

    def __init__(self, logs: Path):
        self.logs = logs
        self.count = 0

    def _paths(self):
        self.count += 1
        return self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"

    @staticmethod
    def env(crash: str | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "FRAG_TEST_CRASH_AT"}
        if crash:
            env["FRAG_TEST_CRASH_AT"] = crash
        return env

    def run(self, *argv, crash: str | None = None, timeout: float = WAIT_S) -> Proc:
        p = self.start(*argv, crash=crash)
        p.wait(timeout)
        return p


class ForkRunner(Runner):
    kind = "fork"

    def __init__(self, logs: Path, cwd: Path, env: dict, warm: list[list[str]]):
        super().__init__(logs)
        self.lock = threading.Condition()
        self.replies: dict[int, dict] = {}
        self.log = open(logs / "zygote.log", "wb")  # noqa: SIM115 - closed in close()
        self.server = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_crash import _zygote; _zygote()"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, **env})
        self.server.stdin.write((json.dumps({"env": env, "cwd": str(cwd), "warm": warm}) + "\n").encode())
        self.server.stdin.flush()
        first = self.server.stdout.readline()
        if not first:
            raise RuntimeError("the fork server died while warming up:\n" + (logs / "zygote.log").read_text())
        self.ready = json.loads(first)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.server.stdout:
            msg = json.loads(line)
            with self.lock:
                self.replies.setdefault(msg["id"], {}).update(msg)
                self.lock.notify_all()
        with self.lock:
            self.replies[-1] = {"dead": True}
            self.lock.notify_all()

    def _request(self, req: dict, stdout: Path, stderr: Path) -> Proc:
        p = Proc(self, self.count, stdout, stderr)
        req.update(id=p.key, stdout=str(stdout), stderr=str(stderr), cwd=os.environ.get("FRAG_HOME", str(ROOT)))
        self.server.stdin.write((json.dumps(req) + "\n").encode())
        self.server.stdin.flush()
        with self.lock:
            assert self.lock.wait_for(lambda: "pid" in self.replies.get(p.key, {}) or -1 in self.replies, 30)
            p.pid = self.replies[p.key]["pid"]
        return p

    def start(self, *argv, crash: str | None = None) -> Proc:
        out, err = self._paths()
        return self._request({"argv": [str(a) for a in argv], "env": self.env(crash)}, out, err)

    def call(self, func: str, *args) -> Proc:
        out, err = self._paths()
        return self._request({"call": func, "args": [str(a) for a in args], "env": self.env(None)}, out, err)

    def poll(self, p: Proc):
        with self.lock:
            return self.replies.get(p.key, {}).get("rc")

    def wait(self, p: Proc, timeout: float) -> int:
        with self.lock:
            if not self.lock.wait_for(lambda: "rc" in self.replies.get(p.key, {}) or -1 in self.replies, timeout):
                os.kill(p.pid, signal.SIGKILL)
                self.lock.wait_for(lambda: "rc" in self.replies.get(p.key, {}), 30)
                raise AssertionError(f"frag pid {p.pid} ran over {timeout} s and was killed: {p!r}")
            return self.replies[p.key]["rc"]

    def close(self):
        self.server.stdin.close()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.log.close()


class ExecRunner(Runner):
    """``.venv/bin/frag`` executables (slow: each imports torch and diffusers)."""

    kind = "exec"

    def __init__(self, logs: Path):
        super().__init__(logs)
        self.procs: dict[int, subprocess.Popen] = {}

    def _popen(self, cmd, env) -> Proc:
        out, err = self._paths()
        p = Proc(self, self.count, out, err)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env,
                                     cwd=os.environ.get("FRAG_HOME", str(ROOT)))
        self.procs[p.key] = popen
        p.pid = popen.pid
        return p

    def start(self, *argv, crash: str | None = None) -> Proc:
        return self._popen([str(FRAG), *map(str, argv)], self.env(crash))

    def call(self, func: str, *args) -> Proc:
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_crash import {func}; {func}(*sys.argv[1:])"
        return self._popen([sys.executable, "-c", code, *map(str, args)], self.env(None))

    def poll(self, p: Proc):
        return self.procs[p.key].poll()

    def wait(self, p: Proc, timeout: float) -> int:
        try:
            return self.procs[p.key].wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs[p.key].kill()
            self.procs[p.key].wait()
            raise AssertionError(f"frag pid {p.pid} ran over {timeout} s and was killed: {p!r}") from None

    def close(self):
        for popen in self.procs.values():
            if popen.poll() is None:
                popen.kill()
                popen.wait()


class Base:
    """The shared outputs, built once per module: a profile, a fragment, a report (and a generate run)."""

    def __init__(self, root: Path):
        self.root = root
        self.profile, self.fragment, self.report = root / "run" / "profile", root / "run" / "fragment", root / "report"
        self.generate = root / "generate"

    def commands(self) -> list[list[str]]:
        return [["profile", PROMPT, *TINY, "--out", str(self.profile)],
                ["extract", str(self.profile), "--out", str(self.fragment)],
                ["report", "--run", str(self.root / "run"), "--compare", "none", "--out", str(self.report)],
                ["generate", PROMPT, *TINY, "--fragment", str(self.fragment), "--out", str(self.generate)]]


@pytest.fixture(scope="module", params=["fork", pytest.param("exec", marks=pytest.mark.slow)])
def frag(request, tmp_path_factory):
    """A runner of frag processes (``frag.run(*argv, crash=POINT)``, ``frag.start``) and the shared outputs
    (``frag.base``)."""
    root = tmp_path_factory.mktemp(f"crash-{request.param}")
    logs = root / "logs"
    logs.mkdir()
    base = Base(root / "base")
    env = {"FRAG_HOME": str(root / "home"), "FRAG_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "FRAG_MODEL_CACHE": os.environ["FRAG_MODEL_CACHE"]}
    (root / "home").mkdir()
    if request.param == "fork":
        runner = ForkRunner(logs, root / "home", env, base.commands())
        assert runner.ready["ready"] == [0, 0, 0, 0], (logs / "zygote.log").read_text()
        assert len(runner.ready["threads"]) == 1, runner.ready  # forking a multi-threaded process could deadlock its children
    else:
        runner = ExecRunner(logs)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            for argv in base.commands():
                p = runner.run(*argv)
                assert p.rc == 0, p
        finally:
            os.environ.clear()
            os.environ.update(saved)
    runner.base = base
    yield runner
    runner.close()


def _fragment_writer(kind: str, profile: str, fragments: str, stop: str, rounds: str = "40") -> None:
    """Another process that keeps writing and deleting fragments for the prompt until ``stop`` exists: ``a`` is
    replaced by ``extract --overwrite`` (a swap) at alternating retentions; ``b`` (newer, so ``auto`` prefers it)
    is written, then deleted file by file, the weights first (as ``rm -rf`` may), so that for a while it is
    incomplete."""
    fragments, stop = Path(fragments), Path(stop)

    def extract(out: Path, retention: str) -> None:
        argv = ["extract", profile, "--out", str(out), "--overwrite", "--head-retention", retention]
        if kind == "exec":
            rc = subprocess.run([str(FRAG), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
        else:
            from fragcli.cli.app import app

            try:
                rc = app(argv, prog_name="frag", standalone_mode=False) or 0
            except SystemExit as exc:
                rc = exc.code
        assert rc == 0, f"extract into {out} failed ({rc})"

    done = 0
    while not stop.exists() and done < int(rounds):
        if done % 2:
            extract(fragments / "a", "0.5" if done % 4 == 1 else "0.7")
        else:
            b = fragments / "b"
            extract(b, "0.6")
            time.sleep(0.3)
            for name in sorted(os.listdir(b), key=lambda n: (not n.endswith(".safetensors"), n != "selection.json", n)):
                (b / name).unlink()
                time.sleep(0.1)
            b.rmdir()
        done += 1
        time.sleep(0.3)  # (leave the generate runs some of the CPU)
    print(f"rounds {done}")


# --------------------------------------------------------------------------------------------------------------
# Checks


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def beside(out: Path) -> set[str]:
    """What frag keeps beside ``out``: its lock, old copies (.out.old-PID), staging folders and temp files
    (.out.PID.*.tmp, the random part shown as *)."""
    names = [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]
    return {re.sub(r"^(\..+\.\d+)\.[^.]+\.tmp$", r"\1.*.tmp", n) for n in names}


def lock_of(out: Path) -> str:
    return (out.parent / f".{out.name}.lock").read_text()


def staging(out: Path, pid: int) -> Path:
    (found,) = [out.parent / n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.{pid}.")]
    return found


def assert_no_torn_json(*roots: Path) -> None:
    """Every JSON file, visible or in a hidden staging folder or old copy, parses (only frag's temp files, which
    a kill may leave half-written and the next run removes, are exempt)."""
    for root in roots:
        for path in Path(root).rglob("*.json"):
            if path.is_file() and not TMP_NAME.match(path.name):
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise AssertionError(f"torn JSON file {path}: {exc}") from None


def assert_whole(folder: Path, kind: str) -> dict:
    """``folder`` is a finished output of ``kind``: its marker lists exactly what is there, its record parses and
    validates, and what the record names exists; returns the marker."""
    from fragcli.outputs import foreign, read_marker

    marker = read_marker(folder)  # schema_version 2: every file with its hash
    assert foreign(folder, marker) is None and all((folder / f).is_file() for f in marker.files), (folder, marker)
    marker = json.loads((folder / MARKER).read_text())
    if kind == "profile":
        from fragcli.profiling.data import read_context, read_profile, read_table

        ctx = read_context(folder)
        read_profile(folder)
        read_table(folder, "blocks")
        assert all((folder / rel).is_file() for rel in ctx["images"].values())
    elif kind == "fragment":
        from fragcli.fragment import verify_fragment

        verify_fragment(folder, None)  # the manifest, and every artifact's hash
    elif kind == "report":
        from fragcli.records import parse_record
        from fragcli.report.schema import ReportSummary

        path = folder / "metrics_summary.json"
        summary = parse_record(ReportSummary, json.loads(path.read_text()), path)
        assert all((folder / f).is_file() for f in summary.files)
    elif kind == "generate":
        from fragcli.records import RunRecord, parse_record

        path = folder / "run.json"
        run = parse_record(RunRecord, json.loads(path.read_text()), path)
        assert all((folder / f).is_file() for f in run.images.values())
    return marker


def killed(p: Proc) -> Proc:
    """A process that the crash hook killed: exit 137, nothing printed about it (it had no chance to)."""
    assert p.rc == 137, p
    assert "Traceback" not in p.err, p
    return p


def one_line_error(p: Proc) -> str:
    assert p.rc == 2, p
    lines = [ln for ln in p.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------------------------
# Kills at named points


def test_profile_killed_at_every_point_of_the_swap(frag, tmp_path):
    out = tmp_path / "profile"
    shutil.copytree(frag.base.profile, out)
    previous = snapshot(out)
    argv = ["profile", PROMPT, *TINY, "--out", out, "--overwrite"]

    # the new folder is complete, the swap not begun: the previous output is untouched
    p1 = killed(frag.run(*argv, crash="staged"))
    assert snapshot(out) == previous
    assert beside(out) == {f".profile.{p1.pid}.*.tmp", ".profile.lock"} and lock_of(out) == str(p1.pid)
    assert_no_torn_json(tmp_path)

    # between the two renames: the target is absent, the previous output whole beside it
    p2 = killed(frag.run(*argv, crash="swap-moved-old"))
    assert not out.exists()
    assert beside(out) == {f".profile.old-{p2.pid}", f".profile.{p2.pid}.*.tmp", ".profile.lock"}  # not p1's
    assert snapshot(tmp_path / f".profile.old-{p2.pid}") == previous
    assert_no_torn_json(tmp_path)

    # the next run restores it and says so; killed after its own swap, before deleting the old copy
    p3 = killed(frag.run(*argv, crash="swap-moved-new"))
    assert f"restored {out} from a swap that was interrupted" in " ".join(p3.err.split()), p3
    assert assert_whole(out, "profile")["pid"] == p3.pid
    assert snapshot(tmp_path / f".profile.old-{p3.pid}") == previous
    assert beside(out) == {f".profile.old-{p3.pid}", ".profile.lock"}
    current = snapshot(out)

    # an atomic write inside the staging folder: its temp file written, not renamed
    p4 = killed(frag.run(*argv, crash="write:context.json"))
    assert snapshot(out) == current
    assert beside(out) == {f".profile.{p4.pid}.*.tmp", ".profile.lock"}  # p3's old copy: removed by p4
    staged = sorted(os.listdir(staging(out, p4.pid)))
    assert "context.json" not in staged and any(re.match(rf"\.context\.json\.{p4.pid}\.", n) for n in staged)
    assert_no_torn_json(tmp_path)

    # a clean run: the new output whole, nothing of the dead processes left (staging, old copies, lock)
    p5 = frag.run(*argv)
    assert p5.rc == 0 and f"profile written to {out}" in p5.out, p5
    assert "warning" not in p5.err
    assert assert_whole(out, "profile")["pid"] == p5.pid
    assert beside(out) == set()
    assert_no_torn_json(tmp_path)


def test_extract_and_an_in_place_manifest_update_killed(frag, tmp_path):
    fragment = tmp_path / "fragment"
    shutil.copytree(frag.base.fragment, fragment)
    previous = snapshot(fragment)

    # bench writes bench.json (staged), then the performance block into the fragment's manifest, in place: killed
    # before that rename, it leaves its temp file inside the fragment and the manifest as it was
    b = killed(frag.run("bench", fragment, "--variants", "1", "--repeats", "1", "--steps", "1",
                        "--out", tmp_path / "bench", crash="write:manifest.json"))
    temps = [n for n in os.listdir(fragment) if TMP_NAME.match(n)]
    assert len(temps) == 1 and temps[0].startswith(f".manifest.json.{b.pid}."), temps
    assert {k: v for k, v in snapshot(fragment).items() if k not in temps} == previous
    assert list(assert_whole(tmp_path / "bench", "bench")["files"]) == ["bench.json"]  # written before the kill
    assert beside(fragment) == {".fragment.lock"} and lock_of(fragment) == str(b.pid)  # bench held the fragment

    # extract --overwrite is not refused for the dead process's temp file (it is removed); killed between renames
    argv = ["extract", frag.base.profile, "--out", fragment, "--overwrite", "--head-retention", "0.5"]
    e1 = killed(frag.run(*argv, crash="swap-moved-old"))
    assert not fragment.exists()
    assert snapshot(tmp_path / f".fragment.old-{e1.pid}") == previous
    assert beside(fragment) == {f".fragment.old-{e1.pid}", f".fragment.{e1.pid}.*.tmp", ".fragment.lock"}

    # restored, and said so; killed while writing the new manifest
    e2 = killed(frag.run(*argv, crash="write:manifest.json"))
    assert f"restored {fragment}" in e2.err, e2
    assert snapshot(fragment) == previous
    assert beside(fragment) == {f".fragment.{e2.pid}.*.tmp", ".fragment.lock"}
    assert_no_torn_json(tmp_path)

    e3 = frag.run(*argv)
    assert e3.rc == 0 and f"fragment written to {fragment}" in e3.out, e3
    assert assert_whole(fragment, "fragment")["pid"] == e3.pid
    manifest = json.loads((fragment / "manifest.json").read_text())
    assert manifest["techniques"][0]["config"]["head_retention_ratio"] == 0.5
    assert beside(fragment) == set()
    assert_no_torn_json(tmp_path)


def test_report_killed_over_a_previous_report(frag, tmp_path):
    report = tmp_path / "report"
    shutil.copytree(frag.base.report, report)
    previous = snapshot(report)
    argv = ["report", "--run", frag.base.root / "run", "--compare", "none", "--out", report, "--overwrite"]

    r1 = killed(frag.run(*argv, crash="write:metrics_summary.json"))
    assert snapshot(report) == previous
    assert beside(report) == {f".report.{r1.pid}.*.tmp", ".report.lock"}

    r2 = killed(frag.run(*argv, crash="swap-moved-old"))
    assert not report.exists() and snapshot(tmp_path / f".report.old-{r2.pid}") == previous
    assert beside(report) == {f".report.old-{r2.pid}", f".report.{r2.pid}.*.tmp", ".report.lock"}
    assert_no_torn_json(tmp_path)

    r3 = frag.run(*argv)
    assert r3.rc == 0 and f"restored {report}" in r3.err, r3
    assert assert_whole(report, "report")["pid"] == r3.pid
    assert beside(report) == set()
    assert_no_torn_json(tmp_path)


def test_a_fresh_out_killed(frag, tmp_path):
    """No previous output, and a parent folder that does not exist yet (the lock is taken once it does)."""
    report = tmp_path / "new" / "report"
    argv = ["report", "--run", frag.base.root / "run", "--compare", "none", "--out", report, "--overwrite"]

    r1 = killed(frag.run(*argv, crash="staged"))
    assert not report.exists()  # nothing half-written is visible
    assert beside(report) == {f".report.{r1.pid}.*.tmp", ".report.lock"}

    r2 = killed(frag.run(*argv, crash="swap-moved-new"))  # moved in, the lock not yet released
    assert assert_whole(report, "report")["pid"] == r2.pid
    assert beside(report) == {".report.lock"} and lock_of(report) == str(r2.pid)
    assert_no_torn_json(tmp_path)

    r3 = frag.run(*argv)
    assert r3.rc == 0 and "warning" not in r3.err, r3
    assert assert_whole(report, "report")["pid"] == r3.pid
    assert beside(report) == set()


# --------------------------------------------------------------------------------------------------------------
# Kills at random times


def test_profile_killed_at_random_times(frag, tmp_path):
    rng = random.Random(90210)
    window = (0.5, 2.5) if frag.kind == "fork" else (8.0, 20.0)  # a forked child starts at once; frag imports first
    out = tmp_path / "profile"
    shutil.copytree(frag.base.profile, out)
    current = snapshot(out)
    argv = ["profile", PROMPT, *TINY, "--out", out, "--overwrite"]
    for _ in range(3):
        p = frag.start(*argv)
        time.sleep(rng.uniform(*window))
        p.kill()
        assert p.wait() in (-signal.SIGKILL, 0), p
        assert "Traceback" not in p.err, p
        if out.exists():
            now = snapshot(out)
            assert now == current or assert_whole(out, "profile")["pid"] == p.pid
            current = now
        else:  # killed between the renames: the previous output is whole beside it
            assert beside(out) == {f".profile.old-{p.pid}", f".profile.{p.pid}.*.tmp", ".profile.lock"}
            assert snapshot(tmp_path / f".profile.old-{p.pid}") == current
        assert_no_torn_json(tmp_path)
    last = frag.run(*argv)
    assert last.rc == 0, last
    assert assert_whole(out, "profile")["pid"] == last.pid
    assert beside(out) == set()


# --------------------------------------------------------------------------------------------------------------
# Concurrency


def test_three_writers_of_the_same_out_at_once(frag, tmp_path):
    """One takes the lock (a dead process's lock is taken over) and writes; the others are refused, one line."""
    out = tmp_path / "profile"
    shutil.copytree(frag.base.profile, out)
    (tmp_path / ".profile.lock").write_text(str(_dead_pid()))
    argv = ["profile", PROMPT, *TINY, "--out", out, "--overwrite"]
    procs = [frag.start(*argv) for _ in range(3)]
    for p in procs:
        p.wait()
    ok = [p for p in procs if p.rc == 0]
    assert len(ok) == 1 if frag.kind == "fork" else len(ok) >= 1, procs
    for p in ok:
        assert f"profile written to {out}" in p.out, p
    pids = {p.pid for p in ok}
    for p in procs:
        if p.rc != 0:
            line = one_line_error(p)
            m = re.fullmatch(rf"error: {re.escape(str(out))} is being written by another frag process \(pid (\d+)\)"
                             r" -- .*", line)
            assert m and int(m[1]) in pids, line
    assert assert_whole(out, "profile")["pid"] in pids
    assert beside(out) == set()


def test_generate_auto_while_fragments_are_written_and_deleted(frag, tmp_path, frag_home):
    from fragcli.fragment import verify_fragment

    fragments = frag_home / "fragments"
    fragments.mkdir()
    shutil.copytree(frag.base.fragment, fragments / "a")
    stop = tmp_path / "stop"
    writer = frag.call("_fragment_writer", frag.kind, frag.base.profile, fragments, stop)
    runs, budget = [], time.monotonic() + (20 if frag.kind == "fork" else 300)
    try:
        while len(runs) < 3 and time.monotonic() < budget:
            g = frag.run("generate", PROMPT, *TINY, "--fragment", "auto", "--out", tmp_path / f"g{len(runs)}")
            runs.append(g)
    finally:
        stop.touch()
    assert writer.wait() == 0, writer
    rounds = int(re.search(r"rounds (\d+)", writer.out)[1])
    used = 0
    for g in runs:
        assert g.rc == 0 and "Traceback" not in g.err, g
        assert_whole(Path(g.out.split("images written to ")[1].strip()), "generate")
        run = json.loads((Path(g.out.split("images written to ")[1].strip()) / "run.json").read_text())
        if run["fragment"]:
            used += 1
            assert Path(run["fragment"]).parent == fragments.resolve() and run["fallback_reason"] is None, g
            assert "warning" not in g.err, g
        else:
            assert run["fallback_reason"] and "warning:" in g.err, g
    assert used >= 1 or frag.kind == "exec", runs
    print(f"{len(runs)} generate runs, {used} with a fragment, while the writer did {rounds} rounds")
    for folder in fragments.iterdir():  # what is left is whole, and nothing of the writer is left behind
        assert not folder.name.startswith("."), folder
        assert_whole(folder, "fragment")
        verify_fragment(folder, None)
