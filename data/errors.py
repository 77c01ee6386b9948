"""The one exception of `sfprompt.data`.

A `ValueError`, because every case is input that does not fit (a data set file without the
arrays it needs, a preprocess config with a missing field, an empty data set); the message names
the file or field, what was expected and what was found, so the CLI can show it as it is.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data set or preprocessing config that cannot be used as given."""
