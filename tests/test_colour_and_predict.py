"""Issue 20, points 5 and 6: image files of mixed colour modes read faithfully (transparent pixels
composited onto `data.background`, or refused naming the file; `prepare` logs the modes it met),
and `foldsoup predict --out`: a CSV of every class's probability.

The imagefolder miniatures come from test_datasets (real digit scans written as PNG files); the
model for `predict` is test_inputs' tiny real run (digits, width-8 CNN, one fine-tune)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foldsoup import cli, steps
from foldsoup.data.imagefolder import read_image, read_imagefolder
from foldsoup.data.prepared import load_prepared
from foldsoup.errors import DataError
from foldsoup.usage import read_images

from test_datasets import data_cfg, digits, write_class_folders  # noqa: F401  (digits: a fixture)
from test_inputs import files  # noqa: F401  (a fixture: the tiny run's files)

HIDDEN = (200, 100, 50)  # the palette colour of the P image's transparent index
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def _modes(folder: Path, grey: np.ndarray) -> dict[str, Path]:
    """One 32x32 PNG per mode in `folder`: RGB and L (opaque), RGBA with its top half
    transparent and black in RGB underneath, P whose left half is a transparent palette index
    (coloured HIDDEN in the palette). Opaque pixels: the digit (grey, or red in RGB/RGBA)."""
    folder.mkdir(parents=True, exist_ok=True)
    red = np.dstack([grey, np.zeros_like(grey), np.zeros_like(grey)])
    paths = {mode: folder / f"{mode.lower()}.png" for mode in ("RGB", "L", "RGBA", "P")}
    Image.fromarray(red).save(paths["RGB"])
    Image.fromarray(grey).save(paths["L"])
    alpha = np.full_like(grey, 255)
    alpha[:16] = 0
    Image.fromarray(np.dstack([red * (alpha[..., None] > 0), alpha])).save(paths["RGBA"])
    index = (grey > 127).astype(np.uint8)  # 0: black, 1: white; 2: the transparent entry
    index[:, :16] = 2
    palette = Image.fromarray(index, mode="P")
    palette.putpalette([*BLACK, *WHITE, *HIDDEN] + [0] * (256 * 3 - 9))
    palette.save(paths["P"], transparency=2)
    for mode, path in paths.items():
        assert Image.open(path).mode == mode
    assert "transparency" in Image.open(paths["P"]).info
    return paths


def _rgb(pixels: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in pixels[:, y, x])


def test_transparent_pixels_take_the_configured_background(tmp_path, digits):
    grey = digits[0][0]
    paths = _modes(tmp_path, grey)
    ink = tuple(int(v) + 16 for v in np.unravel_index(grey[16:, 16:].argmax(), (16, 16)))  # opaque, bottom right
    assert grey[ink] > 127  # of the digit
    for background, colour in (("white", WHITE), ("black", BLACK)):
        rgba = read_image(paths["RGBA"], 32, "stretch", background)
        assert _rgb(rgba, 3, 5) == colour  # transparent (RGB black underneath)
        assert _rgb(rgba, *ink) == (int(grey[ink]), 0, 0)  # opaque: untouched
        pal = read_image(paths["P"], 32, "stretch", background)
        assert _rgb(pal, 20, 3) == colour  # the transparent index, whatever its palette colour
        assert _rgb(pal, *ink) == WHITE  # index 1, opaque
        # Opaque modes do not depend on the background; grey is repeated into R, G and B.
        assert np.array_equal(read_image(paths["RGB"], 32, "stretch", background)[0], grey)
        assert np.array_equal(read_image(paths["L"], 32, "stretch", background), np.repeat(grey[None], 3, axis=0))
    # No background (weights made before data.background existed): the alpha dropped, as then.
    assert _rgb(read_image(paths["RGBA"], 32, "stretch"), 3, 5) == BLACK
    assert _rgb(read_image(paths["P"], 32, "stretch"), 20, 3) == HIDDEN
    # `predict` reads new images with the background its weights' source records.
    source = {"dataset": "imagefolder", "resize": "stretch", "background": "white"}
    [ours] = read_images([str(paths["RGBA"])], 3, source, 32)
    assert _rgb(ours.numpy(), 3, 5) == WHITE
    [legacy] = read_images([str(paths["RGBA"])], 3, {"dataset": "imagefolder", "resize": "stretch"}, 32)
    assert _rgb(legacy.numpy(), 3, 5) == BLACK


def test_refuse_names_the_file_with_transparent_pixels(tmp_path, digits):
    grey = digits[0][0]
    paths = _modes(tmp_path / "one", grey)
    for mode in ("RGBA", "P"):
        with pytest.raises(DataError) as info:
            read_image(paths[mode], 32, "stretch", "refuse")
        assert str(info.value) == (f"{paths[mode]}: has transparent pixels (Pillow mode {mode!r}) and data.background is "
                                   f"'refuse'; save it without transparency, or set data.background to white or black "
                                   f"(the colour transparent pixels become)")
    opaque = tmp_path / "opaque.png"  # an alpha channel, every pixel opaque: nothing to refuse
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])).save(opaque)
    assert np.array_equal(read_image(opaque, 32, "stretch", "refuse"), np.repeat(grey[None], 3, axis=0))
    root = tmp_path / "scans"
    write_class_folders(root, digits, 3, rgb=True)
    (root / "normal" / "001.png").write_bytes(paths["RGBA"].read_bytes())
    with pytest.raises(DataError) as info:
        read_imagefolder(root, 32, background="refuse")
    assert str(info.value).startswith(f"{root / 'normal' / '001.png'}: has transparent pixels (Pillow mode 'RGBA')")
    assert read_imagefolder(root, 32, background="white")[0].shape[1:] == (3, 32, 32)


def test_prepare_reports_the_colour_modes_it_met(tmp_path, digits, capsys):
    """The prepare step's log: files per Pillow mode with an example each, and a warning that
    names the files with transparent pixels, composited onto the (default) background."""
    grey = digits[0][0]
    root = tmp_path / "scans"
    write_class_folders(root / "train", digits, 3, rgb=True)
    write_class_folders(root / "test", digits, 1, rgb=True, offset=3)
    made = _modes(tmp_path / "modes", grey)
    for folder, mode in (("covid", "L"), ("normal", "RGBA"), ("pneumonia", "P")):
        made[mode].rename(root / "train" / folder / f"x_{mode.lower()}.png")
    out = tmp_path / "dataset.safetensors"
    capsys.readouterr()
    steps.prepare({"seed": 0, "data": data_cfg(name="imagefolder", root=str(root), image_size=32)}, str(out))
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines() if "imagefolder:" in line]
    assert lines[:2] == [
        "imagefolder: colour modes of the 15 image files: RGB 12 (e.g. train/covid/000.png), L 1 (e.g. "
        "train/covid/x_l.png), P 1 (e.g. train/pneumonia/x_p.png), RGBA 1 (e.g. train/normal/x_rgba.png); stored as RGB "
        "(L: grey repeated into R, G and B)",
        "WARNING imagefolder: the dataset mixes images with and without transparency: 2 of 15 image files have transparent "
        "pixels (P 1, e.g. train/pneumonia/x_p.png; RGBA 1, e.g. train/normal/x_rgba.png); they are composited onto white "
        "(data.background: white, black or refuse)"]
    data = load_prepared(out)
    rgba = data.pool_images[data.pool_labels == data.classes.index("normal")][-1]  # x_rgba.png: the last of its class
    assert _rgb(rgba, 3, 5) == WHITE  # transparent, composited onto the default background


def test_the_configured_background_reaches_the_prepare_step(tmp_path, digits):
    root = tmp_path / "scans"
    write_class_folders(root, digits, 3, rgb=True)
    _modes(tmp_path / "modes", digits[0][0])["RGBA"].rename(root / "normal" / "x.png")
    out = tmp_path / "dataset.safetensors"
    steps.prepare({"seed": 0, "data": data_cfg(name="imagefolder", root=str(root), image_size=32, background="black",
                                               test_fraction=0.5)}, str(out))
    data = load_prepared(out)
    images = np.concatenate([data.pool_images, data.test_images])
    assert not any(_rgb(image, 3, 5) == WHITE for image in images)
    # Recorded, so every model's metadata tells `predict` to read new images onto the same background.
    assert data.background == "black"
    from foldsoup.steps import Context

    folds = tmp_path / "folds.csv"
    cfg = {"seed": 0, "data": data_cfg(name="imagefolder", root=str(root), image_size=32, background="black"),
           "model": {"name": "digits_cnn"}, "device": "cpu"}
    from foldsoup.data.folds import write_folds

    write_folds(folds, data.pool_labels, np.arange(len(data.pool_labels)) % 2)
    assert Context(cfg, str(out), str(folds)).metadata()["source"]["background"] == "black"
    with pytest.raises(DataError, match="x.png: has transparent pixels"):
        steps.prepare({"seed": 0, "data": data_cfg(name="imagefolder", root=str(root), image_size=32,
                                                   background="refuse")}, str(out))


def test_only_a_changed_background_reaches_the_prepare_job():
    """Runs made before data.background existed keep their prepare job's configuration."""
    from foldsoup.config.job import job_config

    cfg = {"seed": 0, "model": {"name": "open_clip"}, "data": data_cfg(name="imagefolder", root="scans", image_size=32)}
    assert cfg["data"]["background"] == "white" and "background" not in job_config(cfg, "prepare")["data"]
    black = {**cfg, "data": {**cfg["data"], "background": "black"}}
    assert job_config(black, "prepare")["data"]["background"] == "black"
    digits_cfg = {**cfg, "data": data_cfg(name="digits", background="black")}
    assert "background" not in job_config(digits_cfg, "prepare")["data"]  # no image files


# ---------------------------------------------------------------- predict --out


def _images(files, tmp_path: Path, n: int = 4) -> list[str]:
    data = load_prepared(files["data"])
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(data.test_images[i, 0]).save(paths[-1])
    return paths


def test_predict_out_writes_every_class_probability(files, tmp_path, capsys):
    model = str(files["model"])
    paths = _images(files, tmp_path)
    assert cli.main(["predict", model, *paths, "--device", "cpu"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", model, *paths, "--device", "cpu", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: predictions of 4 images\n"
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "predicted_class", "p_1", "p_2", "p_3"]
    assert [row[0] for row in rows[1:]] == paths
    for row, (path, label, prob) in zip(rows[1:], printed, strict=True):
        probs = np.array([float(v) for v in row[2:]])
        assert abs(probs.sum() - 1) < 1e-5 and (probs >= 0).all()
        assert row[1] == ["1", "2", "3"][int(probs.argmax())] == label
        assert f"{probs.max():.4f}" == prob
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_predict_out_errors_are_one_line_naming_the_file(files, tmp_path, capsys):
    model = str(files["model"])
    paths = _images(files, tmp_path, 1)
    argv = ["predict", model, *paths, "--device", "cpu", "--out"]
    nowhere = tmp_path / "missing" / "predictions.csv"
    assert cli.main([*argv, str(nowhere)]) == 1
    assert capsys.readouterr().err == (f"foldsoup predict: error: --out {str(nowhere)!r}: its folder "
                                       f"{str(nowhere.parent)!r} does not exist; create it or give a path in an existing "
                                       f"folder\n")
    assert not nowhere.parent.exists()
    assert cli.main([*argv, str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"foldsoup predict: error: --out {str(tmp_path)!r} is a folder; give the path of a "
                                       f"CSV file, e.g. {str(tmp_path / 'predictions.csv')!r}\n")
    out = tmp_path / "predictions.csv"
    out.write_text("kept\n")
    bad = files["bad"] / "notes.png"
    assert cli.main(["predict", model, *paths, str(bad), "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"foldsoup predict: error: image {str(bad)!r} is a text file")
    assert out.read_text() == "kept\n"  # nothing written
