"""Training checkpoints: what they hold (:mod:`.state`, :mod:`.rng`), the single-file and DCP formats
(:mod:`.dcp`), keeping the last N (:mod:`.retention`), and saving / restoring a run (:mod:`.checkpointer`).
File and folder names: :mod:`cmim.core.checkpoint_paths`."""

from cmim.engine.checkpoint.checkpointer import Checkpointer, find_checkpoint
from cmim.engine.checkpoint.rng import RNGState, parse_rng_state, rng_state, set_rng_state
from cmim.engine.checkpoint.state import RunState, run_state

__all__ = ["Checkpointer", "RNGState", "RunState", "find_checkpoint", "parse_rng_state", "rng_state", "run_state",
           "set_rng_state"]
