"""The comparison engine: a backend against the eager model, per segment and on the final logits
(`compare`, and `export`'s validation of every variant), its results (`diff`) and Polygraphy data."""
