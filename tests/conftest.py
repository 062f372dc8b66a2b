import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FRAG_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# Library calls leave torch's threads alone (only the frag command reads FRAG_THREADS): pin them here, once.
# One thread is steadiest on a shared machine.
import torch  # noqa: E402

torch.set_num_threads(1)

# One session-wide place for generated built-in models (tiny is built once), and a default FRAG_HOME so that
# nothing a test does can land in the working directory, even from session-scoped fixtures.
_SESSION = Path(tempfile.mkdtemp(prefix="frag-tests-"))
os.environ["FRAG_MODEL_CACHE"] = str(_SESSION / "models")
os.environ["FRAG_HOME"] = str(_SESSION / "home")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION, ignore_errors=True)


@pytest.fixture(autouse=True)
def frag_home(tmp_path_factory, monkeypatch):
    """Every test gets its own FRAG_HOME."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("FRAG_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def session_dir():
    return _SESSION
