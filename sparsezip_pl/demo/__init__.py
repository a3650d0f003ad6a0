"""The demo's own tiny LLaVA: synthetic-world training, evaluation and careless-dropping checks."""
