"""Reliability of validation signals (Tables 1-2), bootstrap intervals and ensembles, and the budget analysis."""
