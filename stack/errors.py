"""What a ``credit-risk`` command's exit code means, and the errors that decide it.

| code | meaning | raised as |
| --- | --- | --- |
| 0 | done, or nothing to do | |
| 1 | refused or failed: one ``error:`` line | ``PromotionError``, ``ServiceError``, ``BackendStoreError``, ``MlflowException``, ``httpx.HTTPError``, ``ConnectionError`` |
| 2 | bad arguments only: one ``error:`` line per problem | argparse's own errors, ``UsageError`` (or ``argparse.ArgumentTypeError``, for parts that cannot import this module), a ``pydantic.ValidationError`` of a settings class or of the training flags (``is_usage_error``; any other model's is a bug), ``DataError`` (the training file named by ``--data`` or ``CREDIT_RISK_DATA``) |
| 1 | anything else is a bug: its traceback | |

``stack.cli.main`` applies the table; this module has no imports of its own so that any part
of the CLI layer can raise ``UsageError`` without import cycles.
"""

from __future__ import annotations

import re

USAGE = 2
FAILED = 1

# `user:password@` in a URL-like value (a database URL given without its scheme, say).
_PASSWORD = re.compile(r"(?P<user>[^\s:/@]+):(?P<password>[^\s@/]+)@")


class UsageError(Exception):
    """A flag's value cannot be used (a version that is not a number, an empty reason, ...);
    the message names the flag and what is expected. Exit code 2."""


# Models of arguments rather than of settings: the training flags (``credit-risk train``).
_ARGUMENT_MODELS = frozenset({"TrainingParameters"})


def is_usage_error(error) -> bool:
    """Whether a ``pydantic.ValidationError`` is about the caller's input (exit 2): raised by a
    settings class (a bad variable) or a model of flags. Any other model failing to validate
    (data read from a server or a file this project wrote) is a bug, not a bad argument."""
    from pydantic_settings import BaseSettings

    return error.title in _ARGUMENT_MODELS or error.title in {
        cls.__name__ for cls in _subclasses(BaseSettings)
    }


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def settings_errors(error) -> list[str]:
    """One line per bad value of a ``pydantic.ValidationError`` raised by a settings class:
    ``CREDIT_RISK_X='value': what is expected`` for a variable (its exact name is the error's
    location), ``--flag='value': ...`` for a value a flag gave (fields are named after their
    flags), or the message alone for a check of several values together."""
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:
            lines.append(message)
            continue
        name = ".".join(str(part) for part in problem["loc"])
        if not name.isupper():  # a field, set by the flag of the same name
            name = "--" + name.replace("_", "-")
        if problem["type"] == "missing":
            lines.append(f"{name} is not set: {message}")
            continue
        value = _PASSWORD.sub(r"\g<user>:***@", str(problem["input"]))
        lines.append(f"{name}={value!r}: {message}")
    return lines
