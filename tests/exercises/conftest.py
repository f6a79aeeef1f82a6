"""The exercises' fixtures; the helpers they use live in harness.py."""
import pytest

from harness import load_controller


@pytest.fixture
def controller_with(tmp_path):
    """controller_with(NODE_CAPACITY="2") -> the controller module with those settings."""
    return lambda **settings: load_controller(tmp_path, **settings)


@pytest.fixture
def setting_errors(tmp_path):
    """setting_errors(SCHEDULER_SCORING="Random") -> the lines the controller would print at start."""
    return lambda **settings: load_controller(tmp_path, refuse_bad_settings=False,
                                              **settings).settings.errors
