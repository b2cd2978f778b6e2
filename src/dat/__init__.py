"""dat: Dialogue Action Tokens for steering a frozen language model in goal-directed dialogue."""

from dat.planner import Planner, UpMapping
from dat.steer import SteeredLM
from dat.version import __version__

__all__ = ["SteeredLM", "Planner", "UpMapping", "__version__"]
