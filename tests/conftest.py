"""Suite-wide setup: the tool's cache (`artifact.verified` records) goes to a scratch folder.

Set in the environment, so CLI subprocesses and rank processes use it too: the suite neither reads
records left by earlier runs nor writes into the user's ~/.cache.
"""

from __future__ import annotations

import os

import pytest

from llama_export.artifact.verified import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def _scratch_cache_dir(tmp_path_factory):
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("llama_export_cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
