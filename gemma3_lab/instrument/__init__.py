"""Looking inside a run: hook registration, the activation cache and its memory estimate,
capture during generation, the logit lens, and interventions (ablate, steer, patch)."""
