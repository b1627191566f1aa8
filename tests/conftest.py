import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "fixtures" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"

def load_bench_script(name: str):
    """A ``bench/<name>.py`` script as a module (the scripts are not a package). Registered in
    ``sys.modules`` first: dataclasses resolve a script's string annotations through it."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


has_cuda = torch.cuda.is_available()
cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module: its models are tiny, and on a shared 2-core machine a
    second thread costs more than it gains."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def counterfact_path() -> Path:
    return DATA / "counterfact_dev.json"


@pytest.fixture(scope="session")
def zsre_path() -> Path:
    return DATA / "zsre_dev.json"


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    return DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def toy():
    """kedit's committed toy model (shared: tests that edit it revert exactly)."""
    import kedit_core

    return kedit_core.load_model("toy", device="cpu")


@pytest.fixture(scope="session")
def world():
    """The toy world the committed toy model knows."""
    from kedit_core import toyworld

    return toyworld.load_world()
