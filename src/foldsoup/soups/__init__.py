"""Model soups: weight averaging, choosing ingredients (Alg. 1, BGSS, GSGS, best on val), evaluation."""
