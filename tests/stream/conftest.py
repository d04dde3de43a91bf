"""Fixtures of the stream tests: the tiny trained world (once per session)."""

import pytest

from tests.fakes.world import World, make_world


@pytest.fixture(scope="session")
def world() -> World:
    return make_world()
