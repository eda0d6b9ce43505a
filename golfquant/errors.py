"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class GolfquantError(Exception):
    """Base class: the message names the input and, where possible, the fix."""


class CheckpointError(GolfquantError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class DataError(GolfquantError):
    """A token shard, tokenizer or text corpus that is missing or malformed."""


class ArtifactError(GolfquantError):
    """An artifact file that is damaged, forged or of an unknown format."""


class OptionError(GolfquantError):
    """A flag value that cannot be honoured (unknown scheme, impossible budget, ...)."""
