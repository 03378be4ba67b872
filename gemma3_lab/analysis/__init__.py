"""What a person asks of a capture: comparisons between models, parity with transformers,
and the guided tour's small experiments (attention mass, sweeps, journeys)."""
