"""abliterate: find a behaviour's direction in a language model's residual stream, remove it, prove it, save it.

The package layout is the data flow:

    prompts -> activations -> directions -> selection -> edit -> evaluation -> export

and `pipeline.run` strings the stages together; `cli` is a thin layer over it.
"""

__version__ = "0.1.0"

from .arch import ArchSpec, resolve
from .config import RunConfig
from .directions import Candidates, Direction
from .edit import ablated, added, orthogonalize_
from .errors import AbliterateError
from .evaluation import evaluate
from .models import load_model
from .pipeline import run
from .prompts import ChatFormat, load_prompts

__all__ = [
    "AbliterateError", "ArchSpec", "Candidates", "ChatFormat", "Direction", "RunConfig", "ablated", "added",
    "evaluate", "load_model", "load_prompts", "orthogonalize_", "resolve", "run",
]
