"""Every exception class in trainkit.checkpoint survives a pickle round trip (DCP moves a rank's
error to every rank by pickling it; one that cannot be rebuilt turns a fallback into a crash)."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from typing import Any

import pytest

import trainkit.checkpoint


def exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(trainkit.checkpoint.__path__, "trainkit.checkpoint."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[name] for name in sorted(found)]


def sample_argument(parameter: inspect.Parameter) -> Any:
    annotation = str(parameter.annotation)
    if "int" in annotation:
        return 7
    if "list" in annotation:
        return ["model.weight"]
    return f"a message for {parameter.name}"


def build(cls: type[BaseException]) -> BaseException:
    required = [
        parameter
        for parameter in inspect.signature(cls.__init__).parameters.values()
        if parameter.name != "self"
        and parameter.default is parameter.empty
        and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    return cls(*[sample_argument(parameter) for parameter in required])


def test_the_checkpoint_package_has_the_expected_errors() -> None:
    names = {cls.__name__ for cls in exception_classes()}
    assert {"CorruptCheckpointError", "CheckpointSaveError", "CheckpointMismatchError"} <= names


@pytest.mark.parametrize("cls", exception_classes(), ids=lambda cls: cls.__qualname__)
def test_error_survives_a_pickle_round_trip(cls: type[BaseException]) -> None:
    error = build(cls)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error)
    assert vars(back) == vars(error)
