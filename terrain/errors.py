"""The one error type of terrain/: a problem the user can fix, said in one line (a lower module, so
that the readers and the model loading share it without importing each other)."""


class TerrainError(RuntimeError):
    """A problem the user can fix (missing model, bad argument)."""
