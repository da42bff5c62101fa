"""Figures for routing and attention analysis (matplotlib only; never torch or jax).

One function per figure; each returns a :class:`matplotlib.figure.Figure` built without pyplot
state (works headless and in notebooks) and, where the figure is a single panel, accepts
``ax=`` to draw into an existing Axes. Functions take Trace(s) or analysis results and compute
what they need through :mod:`workbench.analysis`. Expert ``e`` has the same colour everywhere
(:func:`expert_color`); :func:`save` writes PNG, PDF or SVG by suffix.
"""

from .attention import attention_by_layer_type, attention_pattern, layer_type_text
from .diagnostics import (
    ablation_bars,
    capacity_plot,
    parity_errors,
    routing_stability_plot,
    training_curves_plot,
)
from .export import FORMATS, save
from .longcontext import (
    plot_attention_window,
    plot_distance_profile,
    plot_repeat_consistency,
    plot_routing_by_position,
    plot_summary_by_position,
    plot_temperature_effect,
)
from .modality import modality_specialisation_plot, patch_expert_overlay
from .quant import routing_agreement
from .residual import (
    knockout_plot,
    load_by_position_frequency,
    logit_lens_plot,
    patching_heatmap,
    routing_diff_plot,
)
from .routing import (
    expert_flow,
    gate_histogram,
    imbalance_bars,
    load_heatmap,
    margin_histogram,
    run_length_plot,
    same_expert_rate_plot,
    token_routing_layers,
    token_routing_text,
    transition_heatmap,
)
from .specialisation import (
    category_heatmap,
    domain_divergence_plot,
    domain_heatmap,
    domain_share_bars,
    expert_weight_similarity,
    routed_share_plot,
    router_similarity,
    specialisation_by_layer,
    top_tokens_table,
)
from .style import (
    FONT_SIZES,
    expert_cmap,
    expert_color,
    expert_colors,
    layer_colors,
    use_style,
)

__all__ = [
    # modality
    "modality_specialisation_plot", "patch_expert_overlay",
    # routing
    "load_heatmap", "imbalance_bars", "token_routing_text", "margin_histogram",
    "gate_histogram", "same_expert_rate_plot", "run_length_plot", "transition_heatmap",
    "expert_flow", "token_routing_layers",
    # specialisation and experts
    "domain_heatmap", "category_heatmap", "specialisation_by_layer", "domain_divergence_plot",
    "top_tokens_table", "router_similarity", "routed_share_plot", "domain_share_bars",
    "expert_weight_similarity",
    # comparisons and the residual stream
    "routing_diff_plot", "load_by_position_frequency", "patching_heatmap", "logit_lens_plot",
    "knockout_plot",
    # attention
    "attention_pattern", "attention_by_layer_type", "layer_type_text",
    # long context
    "plot_distance_profile", "plot_summary_by_position", "plot_temperature_effect",
    "plot_attention_window", "plot_routing_by_position", "plot_repeat_consistency",
    # diagnostics
    "parity_errors", "ablation_bars", "training_curves_plot", "routing_stability_plot",
    "capacity_plot",
    # quantisation
    "routing_agreement",
    # style and output
    "save", "FORMATS", "use_style", "expert_color", "expert_colors", "expert_cmap",
    "layer_colors", "FONT_SIZES",
]
