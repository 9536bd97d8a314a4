"""The configuration: its schema and checks, the per-job subsets, the results folder's identity."""
