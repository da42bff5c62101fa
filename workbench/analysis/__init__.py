"""Routing and attention analysis on :class:`~workbench.trace.Trace` objects (numpy only).

Every function takes one Trace or a sequence of Traces (tokens of all batch rows and all traces
are pooled, in order trace, batch row, position); domain functions take {domain: traces} or
traces tagged with ``meta["domain"]``. A missing hook raises ValueError naming the hook to
capture. Load counts every top-k assignment; functions documented as "top1" use each token's
first choice (slot 0). Entropies are in nats; Jensen-Shannon divergence is in bits.

Modules: :mod:`.load` (balance, aux losses, capacity), :mod:`.confidence` (entropy, gates,
margins), :mod:`.specialisation` (domain, category, vocabulary), :mod:`.dynamics` (temporal and
cross-layer), :mod:`.experts` (router similarity, shared vs routed), :mod:`.causal` (ablation),
:mod:`.attention` (head statistics, chunk boundaries), :mod:`.training` (training log schema,
stability), :mod:`.table` (the per-layer routing table).
:mod:`.modality`: routing of image patches vs text tokens (needs ``token_modality``).
:mod:`.longcontext`: attention by distance and position from ``attn.summary`` (no T × T
pattern), the query temperature's effect, routing by position and for repeated tokens.
"""

from ._common import moe_layers, num_experts
from .attention import (
    attention_entropy,
    attention_summary,
    by_layer_type,
    cross_chunk_mass,
    distance_by_chunk_offset,
    distance_edges,
    distance_histogram,
    layer_type,
    mean_attention_distance,
    pattern_layers,
    sink_mass,
)
from .causal import ExpertAblation, expert_ablation, next_token_loss
from .compare import RoutingDiff, load_by_frequency, load_by_position, routing_diff
from .confidence import (
    NEAR_TIE_EPS,
    confidence_summary,
    gate_histogram,
    gate_values,
    logit_margin,
    near_tie_fraction,
    near_tie_mask,
    routing_entropy,
    routing_probabilities,
)
from .dynamics import (
    SameExpertRate,
    conditional_entropy,
    cross_layer_table,
    expert_paths,
    layer_nmi,
    next_layer_predictability,
    path_entropy,
    path_tokens,
    run_length_histogram,
    run_lengths,
    same_expert_rate,
    transition_counts,
    transition_matrix,
)
from .experts import (
    expert_weight_similarity,
    most_similar_experts,
    routed_share,
    router_cosine_similarity,
    shared_routed_ratio,
)
from .frames import domain_frame, estimates_frame, load_frame
from .lens import (
    ActivationPatching,
    Knockout,
    LogitLens,
    activation_patching,
    logit_lens,
    top_expert_knockout,
)
from .load import (
    CapacityDrops,
    capacity_drops,
    drop_rate_curve,
    effective_experts,
    expert_counts,
    expert_load,
    load_cv,
    load_entropy,
    load_matrix,
    load_stats,
    max_over_mean,
    max_vio,
    router_z_loss,
    switch_aux_loss,
)
from .longcontext import (
    LAYER_KINDS,
    distance_profile,
    distance_profile_past,
    layer_kind,
    position_bins,
    repeat_consistency,
    routing_by_position,
    summary_by_position,
    summary_layers,
    summary_past,
    temperature_effect,
)
from .modality import ModalityLayer, modality_labels, modality_specialisation, patch_experts
from .specialisation import (
    CategorySpecialisation,
    DomainSpecialisation,
    VocabularySpecialisation,
    category_specialisation,
    domain_js_by_layer,
    domain_specialisation,
    group_by_domain,
    js_divergence,
    normalised_mutual_information,
    top_tokens_per_expert,
    vocabulary_specialisation,
)
from .stats import (
    Estimate,
    category_nmi_estimate,
    domain_js_estimate,
    specialisation_estimates,
    vocabulary_estimate,
)
from .table import format_routing_table, routing_table
from .training import (
    SCHEMA as TRAINING_LOG_SCHEMA,
)
from .training import (
    TrainingCurves,
    load_training_log,
    new_training_log,
    routing_disagreement,
    routing_jaccard,
    routing_stability,
    training_curves,
    training_log_entry,
    training_log_entry_from_trace,
    validate_training_log,
)

__all__ = [
    # modality
    "ModalityLayer", "modality_labels", "modality_specialisation", "patch_experts",
    "NEAR_TIE_EPS", "TRAINING_LOG_SCHEMA",
    # load
    "expert_counts", "expert_load", "load_matrix", "load_cv", "max_over_mean", "max_vio",
    "load_entropy", "effective_experts", "load_stats", "switch_aux_loss", "router_z_loss",
    "CapacityDrops", "capacity_drops", "drop_rate_curve",
    # confidence
    "routing_probabilities", "routing_entropy", "gate_values", "gate_histogram",
    "logit_margin", "near_tie_fraction", "near_tie_mask", "confidence_summary",
    # specialisation
    "js_divergence", "group_by_domain", "DomainSpecialisation", "domain_specialisation",
    "domain_js_by_layer", "CategorySpecialisation", "category_specialisation",
    "normalised_mutual_information", "VocabularySpecialisation", "vocabulary_specialisation",
    "top_tokens_per_expert",
    # uncertainty: bootstrap intervals and shuffle baselines
    "Estimate", "domain_js_estimate", "category_nmi_estimate", "vocabulary_estimate",
    "specialisation_estimates",
    # dynamics
    "SameExpertRate", "same_expert_rate", "run_lengths", "run_length_histogram",
    "transition_counts", "transition_matrix", "conditional_entropy",
    "next_layer_predictability", "layer_nmi", "expert_paths", "path_tokens", "path_entropy",
    "cross_layer_table",
    # experts
    "router_cosine_similarity", "expert_weight_similarity", "most_similar_experts",
    "shared_routed_ratio", "routed_share",
    # causal
    "ExpertAblation", "expert_ablation", "next_token_loss",
    # residual stream and comparisons
    "LogitLens", "logit_lens", "ActivationPatching", "activation_patching", "Knockout",
    "top_expert_knockout", "RoutingDiff", "routing_diff", "load_by_position",
    "load_by_frequency",
    # attention
    "pattern_layers", "attention_entropy", "mean_attention_distance", "sink_mass",
    "cross_chunk_mass", "distance_by_chunk_offset", "distance_edges", "distance_histogram",
    "layer_type", "attention_summary", "by_layer_type",
    # long context (attn.summary, routing by position)
    "LAYER_KINDS", "layer_kind", "summary_layers", "summary_past", "position_bins",
    "distance_profile", "distance_profile_past", "summary_by_position", "temperature_effect",
    "routing_by_position", "repeat_consistency",
    # training and stability
    "new_training_log", "training_log_entry", "training_log_entry_from_trace",
    "validate_training_log", "load_training_log", "TrainingCurves", "training_curves",
    "routing_jaccard", "routing_disagreement", "routing_stability",
    # pandas DataFrames (optional extra)
    "load_frame", "domain_frame", "estimates_frame",
    # table and helpers
    "routing_table", "format_routing_table", "moe_layers", "num_experts",
]
