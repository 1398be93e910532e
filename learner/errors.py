"""Errors that cross actor boundaries and that the receiving side tells apart by type."""


class PartialWeightsError(RuntimeError):
    """A vLLM engine's last weight update failed part-way (its layers are partly loaded, partly
    placeholders): it refuses to generate or score until a complete update arrives. Recoverable:
    the buffer requeues the chunk and the driver's recovery re-sends the weights."""
