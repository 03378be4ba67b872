"""Helpers for the walkthrough notebooks, so that every number in their prose is computed by the
library, not typed in: architecture facts (`facts`), one token's journey (`journey`), attention
beyond the window (`attention`), batched ablation and patching sweeps (`sweeps`), and step-by-step
comparison of generations (`steps`). matplotlib is imported only inside the `plot_*` functions.
"""

from gemma3_lab.analysis.tour.attention import attention_mass, find_tokens, mass_beyond_window, window_hooks
from gemma3_lab.analysis.tour.facts import (
                    GLOBAL_SHADE,
                    NORMS,
                    QK_NORMS,
                    NormGains,
                    full_turns_within,
                    kv_bytes_per_token,
                    norm_gains,
                    parameter_breakdown,
                    plot_norm_gains,
                    plot_rope,
                    rope_wavelengths,
                    shade_globals,
)
from gemma3_lab.analysis.tour.journey import JOURNEY_HOOKS, Journey, plot_journey, token_journey
from gemma3_lab.analysis.tour.steps import (
                    ForcedEffect,
                    divergence_report,
                    forced_effect,
                    plot_steps,
                    steering_vector,
                    step_table,
                    top_k_table,
)
from gemma3_lab.analysis.tour.sweeps import (
                    Sweep,
                    head_ablation_sweep,
                    head_patching_sweep,
                    logit_diff,
                    pair_ids,
                    patching_sweep,
                    plot_sweep,
                    token_id,
)

__all__ = [
    "attention_mass", "find_tokens", "mass_beyond_window", "window_hooks",
    "GLOBAL_SHADE", "NORMS", "QK_NORMS", "NormGains", "full_turns_within", "kv_bytes_per_token", "norm_gains",
    "parameter_breakdown", "plot_norm_gains", "plot_rope", "rope_wavelengths", "shade_globals",
    "JOURNEY_HOOKS", "Journey", "plot_journey", "token_journey",
    "ForcedEffect", "divergence_report", "forced_effect", "plot_steps", "step_table", "steering_vector", "top_k_table",
    "Sweep", "head_ablation_sweep", "head_patching_sweep", "logit_diff", "pair_ids", "patching_sweep", "plot_sweep",
    "token_id",
]
