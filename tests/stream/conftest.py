"""Fixtures of the stream tests: the tiny trained world (once per session)."""

import os

import pytest

from stream.config import load_settings
from tests.fakes.world import World, make_world


@pytest.fixture(scope="session")
def world() -> World:
    return make_world()


@pytest.fixture
def env(monkeypatch):
    """Set ``TERRADAPT_*`` variables (CPU always) and load the settings as a worker would."""

    def load(**variables):
        for name in [k for k in os.environ if k.startswith("TERRADAPT_")]:
            monkeypatch.delenv(name)  # each call starts from the defaults
        monkeypatch.setenv("TERRADAPT_RUNTIME__DEVICE", "cpu")
        monkeypatch.setenv("TERRADAPT_ADAPTATION__DEVICE", "cpu")
        for k, v in variables.items():
            monkeypatch.setenv(f"TERRADAPT_{k}", v)
        return load_settings()

    return load
