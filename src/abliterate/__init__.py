"""abliterate: find a behaviour's direction in a language model's residual stream, remove it, prove it, save it.

The package tree is the data flow:

    model/ -> find/ (prompts, activations, directions, selection) -> edit/ -> measure/ -> export/

`search/` tunes the edit, `show/` draws what was found, and `commands/` strings the stages
together, one file per command; `cli` only mounts them.
"""

__version__ = "0.1.0"

from .commands.run import run
from .config import RunConfig
from .edit.project import ablated, added, orthogonalize_
from .errors import AbliterateError
from .find.directions import Candidates, Direction
from .find.prompts import ChatFormat, load_prompts
from .measure.evaluation import evaluate
from .model.arch import ArchSpec, resolve
from .model.load import load_model

__all__ = [
    "AbliterateError", "ArchSpec", "Candidates", "ChatFormat", "Direction", "RunConfig", "ablated", "added",
    "evaluate", "load_model", "load_prompts", "orthogonalize_", "resolve", "run",
]
