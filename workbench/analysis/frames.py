"""Results as pandas DataFrames (long format, one row per observation), for researchers who
continue in pandas, seaborn or a spreadsheet. pandas is an optional extra
(``pip install workbench[frames]``); it is imported only when a frame is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import Traces, moe_layers
from .load import load_matrix
from .specialisation import DomainTraces, domain_specialisation, group_by_domain
from .stats import Estimate


def pandas() -> Any:
    """The pandas module, or an ImportError saying how to install it."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("DataFrame export needs pandas: pip install 'workbench[frames]' "
                          "(or pip install pandas)") from None
    return pd


def load_frame(traces: Traces, layers: Sequence[int] | None = None) -> Any:
    """Columns layer, expert, load (share of assignments), ratio (load · E)."""
    pd = pandas()
    layers = moe_layers(traces) if layers is None else [int(i) for i in layers]
    M = load_matrix(traces, layers)
    E = M.shape[1]
    return pd.DataFrame({"layer": np.repeat(layers, E), "expert": np.tile(np.arange(E),
                                                                          len(layers)),
                         "load": M.ravel(), "ratio": M.ravel() * E})


def domain_frame(traces: DomainTraces, layers: Sequence[int] | None = None) -> Any:
    """Columns layer, domain, expert, load (the domain's share on the expert), ratio,
    js_bits (the domain's JS from the pooled load) and tokens."""
    pd = pandas()
    groups = group_by_domain(traces)
    pooled = [t for ts in groups.values() for t in ts]
    layers = moe_layers(pooled) if layers is None else [int(i) for i in layers]
    rows = []
    for i in layers:
        ds = domain_specialisation(groups, i)
        for d, dom in enumerate(ds.domains):
            for e in range(ds.load.shape[1]):
                rows.append((i, dom, e, ds.load[d, e], ds.ratio[d, e], ds.js[d],
                             int(ds.tokens[d])))
    return pd.DataFrame(rows, columns=["layer", "domain", "expert", "load", "ratio", "js_bits",
                                       "tokens"])


def estimates_frame(estimates: Mapping[str, Mapping[int, Estimate]]) -> Any:
    """A :func:`~workbench.analysis.specialisation_estimates` result as columns metric, layer,
    value, ci_low, ci_high, baseline, baseline_low, baseline_high, p_value, n_tokens,
    n_docs."""
    pd = pandas()
    rows = [{"metric": m, "layer": int(i), **e.as_dict()}
            for m, per in estimates.items() for i, e in per.items()]
    return pd.DataFrame(rows, columns=["metric", "layer", "value", "ci_low", "ci_high",
                                       "baseline", "baseline_low", "baseline_high", "p_value",
                                       "n_tokens", "n_docs"])
