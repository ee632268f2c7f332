"""Shared test configuration: hypothesis profiles.

"ci": derandomised (the same examples on every run), no deadline, prints a reproduction blob.
"dev": random examples, no deadline.  Select with HYPOTHESIS_PROFILE (default "dev").
"""

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and does not spin on a shared, busy CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Timings cached by lowering passes go to a folder of this test session, never the user's ~/.cache."""
    if "GBLRC_CACHE_DIR" not in os.environ:
        os.environ["GBLRC_CACHE_DIR"] = str(tmp_path_factory.mktemp("gblrc-cache"))
    yield
