"""Configuration files: YAML files merged in order, key by key, as Snakemake merges config.yaml,
--configfile and --config (for scripts and tests that build a configuration without Snakemake).
"""

from __future__ import annotations

import copy
import os

import yaml


def load_yaml_files(*paths: str | os.PathLike) -> dict:
    """Merge YAML files in order, later files overriding earlier ones key by key (as snakemake does)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            merged = deep_update(merged, yaml.safe_load(f) or {})
    return merged


def deep_update(base: dict, overlay: dict) -> dict:
    """`base` with `overlay` merged in, mapping by mapping (a copy: neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
