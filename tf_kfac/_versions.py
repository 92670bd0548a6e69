"""The TensorFlow and Keras releases tf_kfac is tested with, checked at import.

The lowest ones are tested by `.ci/run` in an environment of their own; an older
release gets a clear error here instead of a crash inside the first training step.
"""

from __future__ import annotations

import re

MIN_TENSORFLOW = (2, 18)
MIN_KERAS = (3, 10)


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:  # pragma: no cover - not a release number
        raise ImportError(f"tf_kfac cannot read the version number {version!r}.")
    return int(match.group(1)), int(match.group(2))


def check(tensorflow_version: str, keras_version: str) -> None:
    """Raises ImportError when TensorFlow or Keras is older than tf_kfac supports."""
    for name, version, lowest in (("TensorFlow", tensorflow_version, MIN_TENSORFLOW),
                                  ("Keras", keras_version, MIN_KERAS)):
        if _release(version) < lowest:
            wanted = ".".join(map(str, lowest))
            raise ImportError(
                f"tf_kfac needs {name} {wanted} or newer; {name} {version} is installed. "
                f"Upgrade it, for example with `pip install --upgrade "
                f"'{name.lower()}>={wanted}'`."
            )
