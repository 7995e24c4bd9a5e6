"""The sampler's argument error (its own module so the decoders and params can both raise it)."""


class SamplingError(ValueError):
    """Invalid sampling arguments (the message names the argument and its value)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
