"""Real pretrained models from the model zoo. A test whose model package is missing is skipped with the
command that installs it as the reason; CI installs SmolLM2 (``.ci/run``)."""
import os

import pytest

from kedit_core.zoo import ZOO


def zoo_model_or_skip(alias: str):
    entry = ZOO[alias]
    if not entry.installed():
        pytest.skip(f"needs the {alias} package: {entry.install_command()}")
    return entry


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """A kedit cache of the session's own, so the tests see the first (converting) load too."""
    path = tmp_path_factory.mktemp("kedit-cache")
    previous = os.environ.get("KEDIT_CACHE")
    os.environ["KEDIT_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("KEDIT_CACHE", None)
    else:
        os.environ["KEDIT_CACHE"] = previous


@pytest.fixture(scope="session")
def smollm2(zoo_cache):
    import kedit_core as kedit

    zoo_model_or_skip("smollm2-135m")
    return kedit.load_model("smollm2-135m", device="cpu")
