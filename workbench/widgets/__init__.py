"""Interactive explorers for notebooks (ipywidgets + matplotlib; never torch or jax at import).

Each explorer is an ``ipywidgets.VBox`` built on a plain state class that holds the logic and
renders matplotlib Figures, so the logic is testable without a browser:

- :class:`RoutingExplorer` / :class:`RoutingState` — tokens coloured by expert, a layer slider,
  one token's path through the layers with gates and margins, per-layer load bars.
- :class:`AttentionExplorer` / :class:`AttentionState` — layer and head selectors, the pattern
  with token labels and chunk boundaries, the layer's RoPE/NoPE type, a query token in focus.
- :class:`ParityExplorer` / :class:`ParityState` — per-hook errors, routing flips with their
  margins, fp32 / bf16 switch for the second model.
- :class:`InterventionExplorer` / :class:`InterventionState` — ban / force / zero experts and
  ablate heads by toggles; Δ loss, changed predictions and re-routed tokens, live.

Models are passed in; with ``model=None`` the bundled ``data/scout-mini`` (or
``$WORKBENCH_MODEL``) is loaded in PyTorch. A failing callback is shown in the explorer's
red error box, kept in ``explorer.errors``, logged on the ``workbench.widgets`` logger and
re-raised inside the explorer's ``log_output`` Output widget (see :mod:`workbench.widgets._ui`).
"""

from ._common import BUNDLED_MODEL, MODEL_ENV, PROMPTS, bundled_path, figure_png
from ._ui import Explorer
from .attention import AttentionExplorer, AttentionState
from .intervention import Effect, InterventionExplorer, InterventionState
from .parity import ParityExplorer, ParityState
from .routing import RoutingExplorer, RoutingState

__all__ = [
    "AttentionExplorer", "AttentionState", "BUNDLED_MODEL", "Effect", "Explorer",
    "InterventionExplorer", "InterventionState", "MODEL_ENV", "PROMPTS", "ParityExplorer",
    "ParityState", "RoutingExplorer", "RoutingState", "bundled_path", "figure_png",
]
