"""dat: Dialogue Action Tokens for steering a frozen language model in goal-directed dialogue."""

__version__ = "0.1.0"

from dat.planner import Planner, UpMapping  # noqa: E402
from dat.steer import SteeredLM  # noqa: E402

__all__ = ["SteeredLM", "Planner", "UpMapping", "__version__"]
