"""The from-scratch Gemma 3 network: text decoder, SigLIP tower, projector."""
