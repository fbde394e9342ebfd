"""`qdylora demo`: the whole promise on SmolLM2-135M-Instruct in a few minutes on a laptop CPU."""
