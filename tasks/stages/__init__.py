"""The built-in stages of a labelling run, one module each, registered in pipeline order on import:
verify -> caption -> parse -> match -> region (off by default) -> tag -> threshold -> write (the plan comes before
them all)."""

# isort: off
# The order of these imports is the order of the pipeline: each module registers its stage.
from tasks.stages import verify  # noqa: F401
from tasks.stages import caption  # noqa: F401
from tasks.stages import parse  # noqa: F401
from tasks.stages import match  # noqa: F401
from tasks.stages import region  # noqa: F401
from tasks.stages import tag  # noqa: F401
from tasks.stages import threshold  # noqa: F401
from tasks.stages import write  # noqa: F401

# isort: on
