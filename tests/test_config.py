"""Configuration errors: caught on the merged config before any job is scheduled.

Most cases call `foldsoup.config.schema.validate` (what the Snakefile calls at parse time) on the
embedded config.yaml with one bad override. A few run the real `snakemake` on a bad
--configfile and check the exit code, the message on stderr and that no results folder was
made. Every message must name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from foldsoup.config.data_checks import DIGITS_CLASS_COUNTS, smallest_class_bound
from foldsoup.config.schema import load_schema, validate
from foldsoup.config.yaml_files import deep_update, load_yaml_files
from foldsoup.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.fixture(scope="module")
def base() -> dict:
    cfg = load_yaml_files(REPO / "config.yaml")
    cfg["folds"]["holdout_fraction"] = 0  # the k bounds below are the plain split's (with a holdout: test_holdout.py)
    return cfg


def error_of(base: dict, override: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        validate(deep_update(base, override), **kwargs)
    return str(info.value)


def only_problem(message: str) -> str:
    """The single problem line of a ConfigError message."""
    head, *lines = message.splitlines()
    assert head == "invalid configuration (1 problem(s)):", message
    assert len(lines) == 1, message
    return lines[0].removeprefix("  - ")


# ---------------------------------------------------------------- the shipped configs are valid


@pytest.mark.parametrize("files", [["config.yaml"], ["config.yaml", "presets/smoke.yaml"],
                                   ["config.yaml", "presets/paper-cifar10.yaml"],
                                   ["config.yaml", "presets/paper-cifar10.yaml", "presets/smoke.yaml"]])
def test_shipped_configs_are_valid(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # results folders are checked relative to the working directory
    cfg = validate(load_yaml_files(*(REPO / f for f in files)))
    assert cfg["folds"]["k"] >= 2 and cfg["finetune"]["on_divergence"] == "error"


# ---------------------------------------------------------------- one bad value each

CASES = [
    # wrong types
    ({"finetune": {"epochs": "ten"}}, "finetune.epochs: 'ten' is a string; allowed: an integer >= 1"),
    ({"grid": {"lr": 0.003}}, "grid.lr: 0.003 is a number; allowed: a list of numbers > 0 (at least 1 item(s), no duplicates)"),
    ({"grid": {"mixup": ["yes"]}}, "grid.mixup[0]: 'yes' is a string; allowed: true or false"),
    ({"grid": {"mixup": [False, 1]}}, "grid.mixup[1]: 1 is an integer; allowed: true or false"),
    ({"grid": "lr"}, "grid: 'lr' is a string; allowed: a mapping (key: value) with keys lr, aug, mixup"),
    ({"data": {"download": "no"}}, "data.download: 'no' is a string; allowed: true or false"),
    ({"finetune": {"grad_clip": "none"}}, "finetune.grad_clip: 'none' is a string; allowed: a number > 0 or null"),
    # a number given as a string: from --config, or YAML's 1e-3
    ({"grid": {"lr": ["0.003"]}},
     "grid.lr[0]: '0.003' is a string (write the number without quotes; Snakemake's --config passes values inside "
     "{...} or [...] as strings, so give nested values in a YAML file with --configfile); allowed: a number > 0"),
    (yaml.safe_load("grid: {lr: [1e-3]}"),
     "grid.lr[0]: '1e-3' is a string (YAML reads 1e-3 as text: write 1.0e-3 or 0.001); allowed: a number > 0"),
    ({"finetune": {"batch_size": "32"}}, "finetune.batch_size: '32' is a string (write the number without quotes;"),
    # zero or negative learning rates, epochs, batch sizes
    ({"grid": {"lr": [0.001, 0]}}, "grid.lr[1]: 0 is out of range; allowed: a number > 0"),
    ({"grid": {"lr": [-0.001]}}, "grid.lr[0]: -0.001 is out of range; allowed: a number > 0"),
    ({"pretrain": {"lr": 0.0}}, "pretrain.lr: 0.0 is out of range; allowed: a number > 0"),
    ({"lp": {"l2": [-1]}}, "lp.l2[0]: -1 is out of range; allowed: a number >= 0"),
    ({"lp": {"inner_val_fraction": 1}}, "lp.inner_val_fraction: 1 is out of range; allowed: a number > 0 and < 1"),
    ({"finetune": {"epochs": 0}}, "finetune.epochs: 0 is out of range; allowed: an integer >= 1"),
    ({"finetune": {"batchnorm": "eval"}}, "finetune.batchnorm: 'eval' is not allowed (allowed: one of 'frozen', 'train')"),
    ({"pretrain": {"epochs": -3}}, "pretrain.epochs: -3 is out of range; allowed: an integer >= 1"),
    ({"lp": {"max_iter": 0}}, "lp.max_iter: 0 is out of range; allowed: an integer >= 1"),
    ({"finetune": {"batch_size": 0}}, "finetune.batch_size: 0 is out of range; allowed: an integer >= 1"),
    ({"finetune": {"eval_batch_size": -64}}, "finetune.eval_batch_size: -64 is out of range; allowed: an integer >= 1"),
    ({"pretrain": {"batch_size": 0}}, "pretrain.batch_size: 0 is out of range; allowed: an integer >= 1"),
    ({"finetune": {"epochs": 2.5}}, "finetune.epochs: 2.5 is a number; allowed: an integer >= 1"),
    # unknown augmentation names
    ({"grid": {"aug": ["minimal", "heavy"]}},
     "grid.aug[1]: 'heavy' is not allowed (allowed: one of 'minimal', 'medium', 'strong')"),
    ({"grid": {"aug": ["strnog"]}},
     "grid.aug[0]: 'strnog' is not allowed; did you mean 'strong'? (allowed: one of 'minimal', 'medium', 'strong')"),
    ({"augment": {"heavy": {"scale": [0.5, 1.0], "rotate": 0, "translate": 0, "jitter": 0, "erase": 0}}},
     "augment.heavy: unknown key (allowed under augment: minimal, medium, strong)"),
    # an empty grid
    ({"grid": {"lr": []}}, "grid.lr: [] is empty; allowed: a list of numbers > 0 (at least 1 item(s), no duplicates)"),
    ({"grid": {"aug": []}}, "grid.aug: [] is empty; allowed: a list of values from 'minimal', 'medium', 'strong' (at least 1 item(s), no duplicates)"),
    ({"grid": {"mixup": []}}, "grid.mixup: [] is empty; allowed: a list of true/false values (at least 1 item(s), no duplicates)"),
    # duplicate grid points
    ({"grid": {"lr": [0.001, 0.002, 0.001]}},
     "grid.lr: 0.001 appears more than once in [0.001, 0.002, 0.001]; every value may appear only once "
     "(a repeated grid value would train the same models twice)"),
    ({"grid": {"aug": ["medium", "medium"]}}, "grid.aug: 'medium' appears more than once in ['medium', 'medium']"),
    ({"grid": {"mixup": [True, True]}}, "grid.mixup: True appears more than once in [True, True]"),
    ({"grid": {"lr": [0.001, 0.0010000001]}},
     "grid.lr: [0.001, 0.0010000001] are different values but name the same grid points (lr0.001_...: names keep "
     "6 significant digits); allowed: learning rates that differ within 6 significant digits"),
    # k < 2
    ({"folds": {"k": 1}}, "folds.k: 1 is out of range; allowed: an integer >= 2"),
    ({"folds": {"k": 0}}, "folds.k: 0 is out of range; allowed: an integer >= 2"),
    # k larger than the smallest class, known from the config alone
    ({"folds": {"k": 100}},
     "folds.k: 100 is larger than the smallest class of the training pool: digits class 2 keeps at most 89 pool "
     "image(s) with data.test_fraction = 0.5; every fold needs at least one image of every class, allowed: 2 <= k <= 89"),
    ({"folds": {"k": 5}, "data": {"max_pool": 20}},
     "folds.k: 5 is larger than the smallest class of the training pool: data.max_pool = 20 leaves at most 4 pool "
     "image(s) in the smallest of 5 classes; every fold needs at least one image of every class, allowed: 2 <= k <= 4"),
    # unknown dataset or model names
    ({"data": {"name": "mnist"}}, "data.name: 'mnist' is not allowed; did you mean 'medmnist'? (allowed: one of 'digits', 'cifar10', 'imagefolder', 'medmnist', 'csv')"),
    ({"data": {"name": "cifar"}}, "data.name: 'cifar' is not allowed; did you mean 'cifar10'? (allowed: one of 'digits', 'cifar10', 'imagefolder', 'medmnist', 'csv')"),
    ({"model": {"name": "resnet50"}}, "model.name: 'resnet50' is not allowed (allowed: one of 'digits_cnn', 'open_clip', 'timm')"),
    ({"model": {"norm": "layer"}}, "model.norm: 'layer' is not allowed (allowed: one of 'group', 'batch')"),
    ({"data": {"name": "cifar10", "download": True}, "model": {"name": "open_clip", "arch": "ViT-B/32"}},
     "model.arch: 'ViT-B/32' is not an open_clip model; did you mean 'ViT-B-32'"),
    ({"data": {"name": "cifar10", "download": True}, "model": {"name": "digits_cnn"}},
     "model.name: 'digits_cnn' is pretrained on digits classes; with data.name 'cifar10' allowed: 'open_clip'"),
    # other allowed-value lists
    ({"device": "gpu"}, "device: 'gpu' is not allowed; did you mean 'cpu'? (allowed: one of 'auto', 'cpu', 'cuda')"),
    ({"finetune": {"on_divergence": "ignore"}}, "finetune.on_divergence: 'ignore' is not allowed (allowed: one of 'error', 'exclude')"),
    ({"soups": {"greedy_accept": "=>"}}, "soups.greedy_accept: '=>' is not allowed; did you mean '>'? (allowed: one of '>=', '>')"),
    ({"soups": {"ship": "bgs"}}, "soups.ship: 'bgs' is not allowed; did you mean 'bgss'? (allowed: one of 'best_on_val', "
     "'uniform_soup', 'greedy_soup', 'bgss', 'gsgs', 'best_uniform_per_split', 'best_on_holdout', 'greedy_soup_holdout')"),
    ({"soups": {"ship": "ensemble_gsgs"}}, "soups.ship: 'ensemble_gsgs' is not allowed (allowed: one of 'best_on_val', "),
    # the base has no outer holdout (holdout_fraction 0)
    ({"soups": {"ship": "greedy_soup_holdout"}},
     "soups.ship: 'greedy_soup_holdout' is selected on the outer holdout, and folds.holdout_fraction is 0 (no holdout); "
     "allowed: a method without it (e.g. 'gsgs'), or folds.holdout_fraction > 0"),
    ({"soups": {"ship": "best_on_holdout"}}, "soups.ship: 'best_on_holdout' is selected on the outer holdout"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction: 1.0 is out of range; allowed: a number > 0 and < 1"),
    ({"data": {"classes": [1, 2, 11]}}, "data.classes[2]: 11 is out of range; allowed: an integer >= 0 and <= 9"),
    ({"data": {"classes": [1, 2, 4]}},
     "data.classes and data.pretrain_classes overlap in [4]; pretraining must not see the pool's classes"),
    ({"augment": {"minimal": {"scale": [0.9], "rotate": 0, "translate": 0, "jitter": 0, "erase": 0}}},
     "augment.minimal.scale: [0.9] has 1 item(s); allowed: a list of numbers > 0 and <= 1 (exactly 2 item(s))"),
    ({"results": ""}, "results: '' is empty; allowed: a non-empty string"),
    # unknown keys, at every level, with a suggestion
    ({"finetune": {"epoch": 3}},
     "finetune.epoch: unknown key; did you mean 'epochs'? (allowed under finetune: epochs, batch_size, weight_decay, "
     "warmup_steps, grad_clip, label_smoothing, batchnorm, mixup_alpha, precision, eval_batch_size, compile, on_divergence, resume_every_s, save_dtype)"),
    ({"fold": {"k": 3}}, "fold: unknown key; did you mean 'folds'? (allowed at the top level: results, seed, device, "),
    ({"finetune": {"k": 3}}, "finetune.k: unknown key; it belongs under folds (folds.k) (allowed under finetune: "),
    ({"data": {"nmae": "digits"}}, "data.nmae: unknown key; did you mean 'name'? (allowed under data: name, root, "),
    ({"augment": {"medium": {"scale": [0.6, 1.0], "rotate": 10, "translate": 0.1, "jitter": 0.2, "erase": 0.0, "eras": 0.1}}},
     "augment.medium.eras: unknown key; did you mean 'erase'? (allowed under augment.medium: scale, rotate, translate, jitter, erase)"),
    ({"resources": {"finetune": {"runtime": 60, "mem_mb": 8000, "gpus": 1}}},
     "resources.finetune.gpus: unknown key (allowed under resources.finetune: runtime, mem_mb)"),
    ({"grid": {"learning_rate": [0.1]}}, "grid.learning_rate: unknown key (allowed under grid: lr, aug, mixup)"),
]


@pytest.mark.parametrize("override, expected", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_value_names_key_value_and_what_is_allowed(base, override, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = only_problem(error_of(base, override))
    assert problem.startswith(expected), f"\n got: {problem}\nwant: {expected}"


def test_missing_required_keys(base):
    message = error_of({}, {})
    assert message.splitlines()[1:] == [
        "  - data: missing; it is required (allowed: a mapping (key: value) with keys name, root, download, image_size, "
        "mean, std, interpolation, image_settings, hflip, classes, pretrain_classes, test_fraction, max_pool, max_test, class_names, resize, "
        "background, manifest, columns, image_glob, group_pattern)",
        "  - model: missing; it is required (allowed: a mapping (key: value) with keys name, width, norm, arch, pretrained, "
        "quick_gelu, normalize_features)",
    ]
    assert only_problem(error_of({"data": {}, "model": {"name": "digits_cnn"}}, {})) == (
        "data.name: missing; it is required (allowed: one of 'digits', 'cifar10', 'imagefolder', 'medmnist', 'csv')")
    assert only_problem(error_of(base, {"data": {"name": None}})) == (
        "data.name: None is not allowed (allowed: one of 'digits', 'cifar10', 'imagefolder', 'medmnist', 'csv')")


def test_normalisation_of_the_wrong_number_of_channels(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(base, {"data": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    assert message.splitlines()[1:] == [
        "  - data.mean: [0.5, 0.5, 0.5] has 3 values; digits images have 1 channel(s), allowed: 1 value",
        "  - data.std: [0.5, 0.5, 0.5] has 3 values; digits images have 1 channel(s), allowed: 1 value",
    ]
    assert "  - data.mean and data.std need the same length, got 2 and 1" in error_of(base, {"data": {"mean": [0.5, 0.5]}})


def test_every_problem_is_listed(base):
    message = error_of(base, {"finetune": {"epoch": 3, "batch_size": 0}, "grid": {"lr": []}, "folds": {"k": 1}})
    assert message.startswith("invalid configuration (4 problem(s)):")
    for key in ("finetune.epoch", "finetune.batch_size", "grid.lr", "folds.k"):
        assert f"  - {key}: " in message


def test_not_a_mapping():
    with pytest.raises(ConfigError, match=r"expected a mapping of keys, got a list \(\[1\]\)"):
        validate([1])


def test_integral_floats_become_integers(base):
    cfg = validate(deep_update(base, {"finetune": {"epochs": 2.0}, "folds": {"k": 3.0}}), check_paths=False)
    assert cfg["finetune"]["epochs"] == 2 and type(cfg["finetune"]["epochs"]) is int
    assert type(cfg["folds"]["k"]) is int
    assert type(cfg["grid"]["lr"][0]) is float  # numbers stay numbers


def test_the_method_to_ship_defaults_to_gsgs_and_holdout_methods_need_a_holdout(base):
    assert validate(base, check_paths=False)["soups"]["ship"] == "gsgs"  # the paper's answer
    for method in ("greedy_soup_holdout", "best_on_holdout"):
        with_holdout = deep_update(base, {"soups": {"ship": method}, "folds": {"holdout_fraction": 0.2}})
        assert validate(with_holdout, check_paths=False)["soups"]["ship"] == method


def test_a_partial_augmentation_keeps_its_other_defaults(base):
    """`augment: {strong: {erase: 0.2}}` changes one knob; the rest stay strong's, as in every section."""
    strong = load_schema()["properties"]["augment"]["properties"]["strong"]["default"]
    cfg = validate(deep_update(base, {"augment": {"strong": {"erase": 0.2}}}), check_paths=False)
    assert cfg["augment"]["strong"] == {**strong, "erase": 0.2} and strong["erase"] != 0.2
    assert cfg["augment"]["medium"] == validate(base, check_paths=False)["augment"]["medium"]
    assert only_problem(error_of(base, {"augment": {"strong": {"erase": 2}}})) == (  # the knob given is still checked
        "augment.strong.erase: 2 is out of range; allowed: a number >= 0 and <= 1")


def test_a_new_augmentation_still_needs_every_knob(base):
    """No defaults to fill from: refused, naming it (the shipped schema allows no new names) or, where
    a schema admits new names, naming each knob it lacks."""
    assert only_problem(error_of(base, {"augment": {"heavy": {"erase": 0.2}}})) == (
        "augment.heavy: unknown key (allowed under augment: minimal, medium, strong)")
    schema = load_schema()
    schema["properties"]["augment"]["additionalProperties"] = {"$ref": "#/$defs/augmentation"}
    with pytest.raises(ConfigError) as info:
        validate(deep_update(base, {"augment": {"heavy": {"erase": 0.2}}}), schema, check_paths=False)
    assert [line.split(" (allowed")[0] for line in str(info.value).splitlines()[1:]] == [
        f"  - augment.heavy.{knob}: missing; it is required" for knob in ("scale", "rotate", "translate", "jitter")]


# ---------------------------------------------------------------- folders on disk


def test_results_folder_that_is_a_file(base, tmp_path):
    (tmp_path / "results").write_text("not a folder")
    assert only_problem(error_of(base, {"results": str(tmp_path / "results")})) == (
        f"results: {str(tmp_path / 'results')!r} exists and is not a folder; allowed: a folder (existing or new)")
    assert only_problem(error_of(base, {"results": str(tmp_path / "results" / "run1")})) == (
        f"results: {str(tmp_path / 'results' / 'run1')!r} cannot be created, because {str(tmp_path / 'results')!r} "
        f"is a file; allowed: a folder path")
    validate(deep_update(base, {"results": str(tmp_path / "results")}), check_paths=False)  # only checked on disk


def test_data_folder_that_does_not_exist(base, tmp_path):
    cifar = {"data": {"name": "cifar10", "root": str(tmp_path / "nope"), "download": False}, "model": {"name": "open_clip"}}
    assert only_problem(error_of(base, cifar)) == (
        f"data.root: folder {str(tmp_path / 'nope')!r} does not exist; allowed: a folder holding cifar-10-batches-py/ "
        f"(or set data.download: true to fetch CIFAR-10 there)")
    (tmp_path / "nope").mkdir()
    assert only_problem(error_of(base, cifar)) == (
        f"data.root: folder {str(tmp_path / 'nope')!r} has no cifar-10-batches-py/ inside; allowed: a folder holding "
        f"torchvision's CIFAR-10 files (or set data.download: true to fetch them there)")
    (tmp_path / "nope" / "cifar-10-python.tar.gz").write_bytes(b"")  # the archive, not yet extracted
    assert only_problem(error_of(base, cifar)) == (
        f"data.root: folder {str(tmp_path / 'nope')!r} holds cifar-10-python.tar.gz but no cifar-10-batches-py/; "
        f"allowed: data.download: true (torchvision checks the archive's md5 and extracts it, no network needed), or "
        f"extract it there yourself (tar xzf)")
    validate(deep_update(base, {**cifar, "data": {**cifar["data"], "download": True}}))
    (tmp_path / "nope" / "cifar-10-batches-py").mkdir()
    validate(deep_update(base, cifar))
    (tmp_path / "file").write_text("")
    assert only_problem(error_of(base, {**cifar, "data": {**cifar["data"], "root": str(tmp_path / "file"), "download": True}})) == (
        f"data.root: {str(tmp_path / 'file')!r} is a file; allowed: a folder holding (or receiving, with "
        f"data.download: true) cifar-10-batches-py/")
    validate(deep_update(base, {**cifar, "data": {**cifar["data"], "root": str(tmp_path / "new"), "download": True}}))


def test_pretrained_checkpoint_that_does_not_exist(base, tmp_path):
    bad = {"data": {"name": "cifar10", "download": True},
           "model": {"name": "open_clip", "pretrained": str(tmp_path / "clip.safetensors"), "quick_gelu": True}}
    assert only_problem(error_of(base, bad)) == (
        f"model.pretrained: checkpoint file {str(tmp_path / 'clip.safetensors')!r} does not exist; allowed: an "
        f"open_clip pretrained tag (e.g. 'openai') or an existing .safetensors/.pt file")


# ---------------------------------------------------------------- k against the smallest class


def test_digits_class_counts_match_scikit_learn():
    import numpy as np
    from sklearn.datasets import load_digits

    assert tuple(np.bincount(load_digits().target).tolist()) == DIGITS_CLASS_COUNTS


@pytest.mark.parametrize("classes, test_fraction, max_pool", [([1, 2, 3, 5, 7], 0.5, None), ([8, 9], 0.5, None),
                                                              ([0, 1, 2], 0.1, None), ([3, 8], 0.77, None),
                                                              ([1, 2, 3, 5, 7], 0.5, 37)])
def test_parse_time_bound_never_rejects_a_k_that_works(classes, test_fraction, max_pool):
    """The parse-time bound is an upper bound of the real smallest class (never a false alarm)."""
    import numpy as np

    from foldsoup.data.prepared import prepare

    data_cfg = {"name": "digits", "classes": classes, "pretrain_classes": [4, 6], "test_fraction": test_fraction,
                "max_pool": max_pool, "max_test": None, "root": "data"}
    smallest = int(np.bincount(prepare(data_cfg, 0).pool_labels).min())
    bound, _ = smallest_class_bound(data_cfg)
    assert smallest <= bound <= smallest + 1


def test_k_between_bound_and_real_class_size_fails_at_the_folds_step(base, tmp_path):
    """digits 8 and 9 with test_fraction 0.5: the bound allows k = 88, class 8 keeps 87. The
    `folds` step (before any training) names the class."""
    from foldsoup import steps
    from foldsoup.errors import DataError

    cfg = validate(deep_update(base, {"results": str(tmp_path), "data": {"classes": [8, 9], "pretrain_classes": [0, 4]},
                                      "folds": {"k": 88}}))
    data, folds = str(tmp_path / "prepared" / "dataset.safetensors"), str(tmp_path / "folds.csv")
    steps.prepare(cfg, data)
    with pytest.raises(DataError) as info:
        steps.folds(cfg, data, folds)
    assert str(info.value) == ("folds.k = 88 is larger than class '8', which has only 87 pool image(s); every fold needs "
                               "at least one image of every class (allowed: k <= 87, or more images of that class)")
    assert not os.path.exists(folds)


def test_parse_time_checks_import_no_torch():
    """What the Snakefile imports and runs at parse time (validate, with open_clip's and timm's
    names read lazily) imports neither torch nor open_clip nor timm: seconds at every parse."""
    code = ("import sys; from foldsoup.config import results_folder; from foldsoup.config.schema import validate; "
            "from foldsoup.config.yaml_files import deep_update, load_yaml_files; cfg = load_yaml_files('config.yaml'); "
            "validate(cfg, check_paths=False); validate(deep_update(cfg, {'data': {'name': 'cifar10'}, "
            "'model': {'name': 'open_clip'}}), check_paths=False); "
            "heavy = sorted({'torch', 'open_clip', 'timm'} & set(sys.modules)); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- through the real snakemake


@pytest.fixture(scope="module")
def no_slurm_probe(tmp_path_factory) -> dict:
    """The SLURM executor plugin runs `scontrol show config` when snakemake starts; on a machine
    with SLURM installed but no controller running that waits 10 s. A stub answers at once."""
    stub = tmp_path_factory.mktemp("bin") / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}


def run_snakemake(workdir: Path, env: dict, config: dict | None, *args: str) -> subprocess.CompletedProcess:
    configs = [str(REPO / "config.yaml")]
    if config is not None:
        (workdir / "bad.yaml").write_text(yaml.safe_dump(config))
        configs.append("bad.yaml")
    cmd = [str(SNAKEMAKE), *args, "-s", str(REPO / "Snakefile"), "--cores", "1", "--configfile", *configs]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


SNAKEMAKE_CASES = [
    # (config, extra args, expected line on stderr)
    ({"finetune": {"epoch": 3}}, ["-n"], "finetune.epoch: unknown key; did you mean 'epochs'?"),
    ({"grid": {"lr": []}}, [], "grid.lr: [] is empty; allowed: a list of numbers > 0"),  # not a dry run
    (yaml.safe_load("grid: {lr: [1e-3, 0.002]}"), ["-n"],
     "grid.lr[0]: '1e-3' is a string (YAML reads 1e-3 as text: write 1.0e-3 or 0.001); allowed: a number > 0"),
]


@pytest.mark.slow
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed beside this python")
@pytest.mark.parametrize("config, args, expected", SNAKEMAKE_CASES, ids=["typo", "empty-grid", "yaml-1e-3"])
def test_snakemake_stops_at_parse_time(tmp_path, no_slurm_probe, config, args, expected):
    result = run_snakemake(tmp_path, no_slurm_probe, config, *args)
    assert result.returncode != 0
    assert "foldsoup: invalid configuration (1 problem(s)):" in result.stderr, result.stderr
    assert f"  - {expected}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake") == ["bad.yaml"]


@pytest.mark.slow
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed beside this python")
def test_snakemake_config_override_of_a_nested_value(tmp_path, no_slurm_probe):
    """--config finetune={epochs: 2} arrives as the string '2': the message says why and what to do."""
    result = run_snakemake(tmp_path, no_slurm_probe, None, "-n", "--config", "finetune={epochs: 2}")
    assert result.returncode != 0
    assert ("  - finetune.epochs: '2' is a string (write the number without quotes; Snakemake's --config passes "
            "values inside {...} or [...] as strings, so give nested values in a YAML file with --configfile); "
            "allowed: an integer >= 1") in result.stderr, result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed beside this python")
def test_snakemake_fails_at_the_folds_job_naming_the_class(tmp_path, no_slurm_probe):
    """k passes the parse-time bound but not the real data: the `folds` job fails, its log says
    why, and nothing after it (linear probe, fine-tuning) ran."""
    config = {"data": {"classes": [8, 9], "pretrain_classes": [0, 4]}, "folds": {"k": 88, "holdout_fraction": 0}}
    result = run_snakemake(tmp_path, no_slurm_probe, config, "results/folds.csv")
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "folds.log").read_text()
    expected = "foldsoup folds: error: folds.k = 88 is larger than class '8', which has only 87 pool image(s)"
    assert expected in log
    assert expected in result.stderr  # show-failed-logs (profiles/default) prints it too
    assert not (tmp_path / "results" / "folds.csv").exists()
    assert not (tmp_path / "results" / "lp").exists() and not (tmp_path / "results" / "models").exists()


def test_the_bad_inputs_page_shows_todays_messages():
    """docs/bad-inputs.md is generated from CASES above (scripts/bad_inputs_page.py); a message
    changed without regenerating it fails here."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bad_inputs_page.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
