"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TestbedError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    __test__ = False  # not a pytest test class, despite the name


class OutOfMemory(Exception):
    """The plan's training footprint exceeds the device's memory budget, as a real device would hit."""
