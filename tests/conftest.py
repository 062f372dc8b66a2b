import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FRAG_THREADS", "1")


@pytest.fixture(autouse=True)
def frag_home(tmp_path_factory, monkeypatch):
    """Every test gets its own FRAG_HOME; built-in models are shared through one session-wide cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("FRAG_HOME", str(home))
    monkeypatch.setenv("FRAG_MODEL_CACHE", str(_shared_cache(tmp_path_factory)))
    return home


_CACHE = {}


def _shared_cache(factory):
    if "dir" not in _CACHE:
        _CACHE["dir"] = factory.mktemp("model-cache")
    return _CACHE["dir"]
