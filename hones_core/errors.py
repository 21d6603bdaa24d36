"""Every error hones_core raises on purpose, in one hierarchy.

Catch `HonesError` for "anything this library refused, with a message that says what to do";
catch a subclass for one way of failing. Each class also derives from the builtin a caller
would have caught before it existed (`ValueError`, `OSError`, `RuntimeError`), so
`except ValueError` keeps working. Where a failure is about one thing (a repo, a file, a
model), the error carries it as an attribute, so code can react without parsing messages.
"""

from __future__ import annotations

from pathlib import Path


class HonesError(Exception):
    """Base class of every error hones_core raises on purpose; the message names the fix."""


# ----- models --------------------------------------------------------------------------------------


class UnsupportedModelError(HonesError, ValueError):
    """The model's family or module layout is not one HONES knows how to intervene on."""


class ModelLoadError(HonesError, OSError):
    """The model or its processor could not be loaded.

    Attributes:
        model: the Hub id or local path asked for.
        revision: the branch, tag or commit asked for (None: the default branch).
    """

    def __init__(self, message: str, *, model: str | None = None, revision: str | None = None):
        super().__init__(message)
        self.model, self.revision = model, revision


class TemplateError(HonesError, ValueError):
    """The chat template or tokenizer does not let us place an answer after a prompt."""


# ----- data ----------------------------------------------------------------------------------------


class DataFormatError(HonesError, ValueError):
    """A data file or one of its records is malformed; the message names where and what."""


# ----- rankings artifacts --------------------------------------------------------------------------


class RankingsError(HonesError):
    """Base class of everything raised about a rankings artifact."""


class RankingsSchemaError(RankingsError):
    """An artifact file is missing, unreadable, or holds the wrong keys, shapes or dtypes."""


class RankingsMismatchError(RankingsError):
    """The rankings were computed for a model with other shapes or another family."""


class RankingsNotFoundError(RankingsError):
    """No artifact at that path, or the Hub repo / revision cannot be found or reached.

    Attributes:
        source: the local path or Hub dataset repo id asked for.
        revision: the branch, tag or commit asked for (None: the default branch).
    """

    def __init__(self, message: str, *, source: str | None = None, revision: str | None = None):
        super().__init__(message)
        self.source, self.revision = source, revision


# ----- resumable runs ------------------------------------------------------------------------------


class ProgressMismatchError(HonesError, RuntimeError):
    """An output folder holds progress (a rank run's state, a steer run's results or checkpoint)
    of a run with other arguments.

    Attributes:
        path: the file or folder holding the other run's progress.
    """

    def __init__(self, message: str, *, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


# ----- the command line ---------------------------------------------------------------------------


class UsageError(HonesError, ValueError):
    """A command-line value cannot be used (a malformed list, a split that is not held out, ...)."""


# ----- deploying the app -------------------------------------------------------------------------


class DeployError(HonesError, RuntimeError):
    """A Space cannot be deployed as asked: a malformed input (refused before any request), no
    token, a model or rankings repo the Hub does not have, or a request the Hub refused.

    Attributes:
        space_id: the Space asked for.
    """

    def __init__(self, message: str, *, space_id: str | None = None):
        super().__init__(message)
        self.space_id = space_id


# ----- the app -------------------------------------------------------------------------------------


class DemoInputError(HonesError, ValueError):
    """Something a visitor sent cannot be used; the message says what and how to fix it."""


class DemoConfigError(HonesError, RuntimeError):
    """The app cannot start with this model / rankings configuration."""


__all__ = ["HonesError", "UnsupportedModelError", "ModelLoadError", "TemplateError", "DataFormatError",
           "RankingsError", "RankingsSchemaError", "RankingsMismatchError", "RankingsNotFoundError",
           "ProgressMismatchError", "UsageError", "DeployError", "DemoInputError", "DemoConfigError"]
