"""The error hierarchy: one base, the builtins callers caught before, attributes on the specific ones."""

import pytest

from hones_core import errors, rankings
from hones_core.models import load_vlm
from hones_core.pipeline import ProgressMismatchError
from hones_core.steering import SteeringProgressError


def test_every_error_is_a_hones_error_and_keeps_its_builtin():
    expected = {"UnsupportedModelError": ValueError, "ModelLoadError": OSError, "TemplateError": ValueError,
                "DataFormatError": ValueError, "ProgressMismatchError": RuntimeError,
                "DemoInputError": ValueError, "DemoConfigError": RuntimeError}
    for name, builtin in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HonesError) and issubclass(cls, builtin), name
    for name in ("RankingsSchemaError", "RankingsMismatchError", "RankingsNotFoundError"):
        assert issubclass(getattr(errors, name), errors.RankingsError)
    assert issubclass(errors.RankingsError, errors.HonesError)


def test_one_class_per_failure_under_old_names():
    # the names modules exported before errors.py are the same classes, not copies
    assert rankings.RankingsNotFoundError is errors.RankingsNotFoundError
    assert SteeringProgressError is ProgressMismatchError is errors.ProgressMismatchError


def test_model_load_error_names_the_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(errors.ModelLoadError, match="no such model directory") as info:
        load_vlm(str(missing), revision="v1")
    assert info.value.model == str(missing) and info.value.revision == "v1"


def test_rankings_not_found_names_the_source(tmp_path):
    with pytest.raises(errors.RankingsNotFoundError) as info:
        rankings.load(tmp_path / "absent")
    assert info.value.source == str(tmp_path / "absent")
