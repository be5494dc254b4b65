"""`pruner-viz` and the coverage figures: hand-computed grids, a real PNG read back pixel by pixel, clear errors.

The model is tiny-llava (24 x 24 grid) built once per session into a tmp cache; tiny-llava-gqa (16 x 16) checks a
second grid size, tiny-qwen2-vl (8 x 12 merged tokens of 28 px) a second family. Images are scikit-image's
photographs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cases import write_bomb_png
from pruner_core import PrunerConfig, method_names
from pruner_core.adapters import embed_prompt, image_grid, llava_prompt, load_llava, prefill_with_pruning, resolve_model
from pruner_core.coverage import Coverage, coverage, kept_groups, kept_mask, mean_gap, region_bounds, regions_hit
from pruner_core.viz import DIM, KEPT_RGB, PIVOT_RGB, VizError, VizOptions, load_image, main, visualize

SIX = "vlm_pruner,dart,divprune,fastv,visionzip,random"


# ---------------------------------------------------------------- coverage: hand-computed grids


def test_coverage_of_the_diagonal_of_a_4x4_grid():
    cov = coverage([0, 5, 10, 15], (4, 4))
    assert (cov.kept, cov.total) == (4, 16)
    assert (cov.regions_hit, cov.regions_total) == (4, 16)  # 1x1 regions: one per kept token
    assert cov.region_fraction == 0.25
    assert cov.kept_groups == 4  # diagonal neighbours are not 4-connected
    # off-diagonal distance 1: six tokens at 1; distance 2: four at sqrt(2); distance 3: two at sqrt(5)
    assert cov.mean_gap == pytest.approx((6 * 1 + 4 * math.sqrt(2) + 2 * math.sqrt(5)) / 12)


def test_coverage_of_a_block_and_a_stray_token():
    cov = coverage([0, 1, 4, 5, 15], (4, 4))  # 2x2 block top-left, one token bottom-right
    assert cov.kept_groups == 2
    assert (cov.regions_hit, cov.regions_total) == (5, 16)
    mask = kept_mask([0, 1, 4, 5, 15], (4, 4))
    # distances of the 11 discarded tokens, row by row (y, x): (0,2) 1, (0,3) 2, (1,2) 1, (1,3) 2, (2,0) 1, (2,1) 1,
    # (2,2) sqrt2, (2,3) 1, (3,0) 2, (3,1) 2, (3,2) 1
    expected = (1 + 2 + 1 + 2 + 1 + 1 + math.sqrt(2) + 1 + 2 + 2 + 1) / 11
    assert mean_gap(mask) == pytest.approx(expected)


def test_regions_on_grids_not_divisible_by_four():
    assert region_bounds(6) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert region_bounds(5) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert region_bounds(2) == [(0, 1), (1, 2)]  # fewer patches than regions: one region per patch
    assert regions_hit(kept_mask([0], (6, 5))) == (1, 16)
    assert regions_hit(kept_mask([0, 5], (2, 3))) == (2, 6)  # 2 x 3 regions
    # (y, x) = (1, 2) and (2, 2) share region (1, 2) (rows 1..2, column 2); (5, 3) is in region (3, 3)
    cov = coverage([7, 12, 28], (6, 5))
    assert (cov.regions_hit, cov.kept_groups) == (2, 2)
    assert coverage([4, 9], (6, 5)).regions_hit == 2  # (0, 4) and (1, 4): rows 0 and 1 are different bands


def test_coverage_of_everything_and_of_a_line():
    full = coverage(range(24 * 24), (24, 24))
    assert (full.region_fraction, full.mean_gap, full.kept_groups) == (1.0, 0.0, 1)
    row = coverage(range(7), (7, 7))  # the top row of a 7x7 grid
    assert row.kept_groups == 1
    assert row.regions_hit == 4
    assert row.mean_gap == pytest.approx(sum(range(1, 7)) * 7 / 42)  # every column: distances 1..6


def test_coverage_to_dict_and_bad_input():
    data = coverage([0, 3], (2, 2)).to_dict()
    assert data == {"kept": 2, "total": 4, "regions_hit": 2, "regions_total": 4, "mean_gap": 1.0, "kept_groups": 2,
                    "region_fraction": 0.5}
    assert isinstance(coverage([0], (1, 1)), Coverage)
    with pytest.raises(ValueError, match="distinct"):
        coverage([1, 1], (2, 2))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        coverage([4], (2, 2))
    with pytest.raises(ValueError, match="rows, cols"):
        coverage([0], (0, 3))
    assert kept_groups(kept_mask([], (3, 3))) == 0


# ---------------------------------------------------------------- the PNG, read back


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("viz-zoo")
    resolve_model("tiny-llava", directory)
    return directory


@pytest.fixture(scope="session")
def six_panels(cache_dir, tmp_path_factory):
    """pruner-viz (main) on tiny-llava, all six methods, the astronaut -> (png path, sidecar dict, stdout)."""
    out = tmp_path_factory.mktemp("viz") / "sub" / "viz.png"  # a missing folder is created
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--model", "tiny-llava", "--image", "astronaut", "--keep", "64", "--methods", SIX,
                     "--out", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0
    return out, json.loads(out.with_suffix(".json").read_text()), stdout.getvalue()


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # [H, W, 3]


def panel_cells(png: np.ndarray, box: dict) -> np.ndarray:
    """A panel's pixels as [rows, cols, cell, cell, 3]."""
    rows, cols, cell = box["rows"], box["cols"], box["cell"]
    region = png[box["top"] : box["top"] + rows * cell, box["left"] : box["left"] + cols * cell]
    return region.reshape(rows, cell, cols, cell, 3).transpose(0, 2, 1, 3, 4)


def outlined(cells: np.ndarray, colour: tuple[int, int, int]) -> set[int]:
    """Tokens whose cell's outermost pixel ring is entirely `colour`."""
    rows, cols = cells.shape[:2]
    ring = np.concatenate([cells[:, :, 0], cells[:, :, -1], cells[:, :, :, 0], cells[:, :, :, -1]], axis=2)
    hits = (ring == np.array(colour, dtype=np.uint8)).all(-1).all(-1)  # [rows, cols]
    return {int(i) for i in np.flatnonzero(hits.reshape(-1))}


def inner_ring(cells: np.ndarray, depth: int) -> np.ndarray:
    """The pixel ring `depth` in from each cell's edge (inside the outline, clear of the label) -> [rows, cols, P, 3]."""
    inner = cells[:, :, depth:-depth, depth:-depth]
    return np.concatenate([inner[:, :, 0], inner[:, :, -1], inner[:, :, 1:-1, 0], inner[:, :, 1:-1, -1]], axis=2)


def test_png_has_one_panel_per_method_and_grows_with_panels(six_panels):
    out, sidecar, stdout = six_panels
    png = read_rgb(out)
    assert [panel["method"] for panel in sidecar["panels"]] == SIX.split(",")
    assert (png.shape[1], png.shape[0]) == tuple(sidecar["image_px"])
    boxes = [panel["box"] for panel in sidecar["panels"]]
    assert sidecar["grid"] == [24, 24] and all(box["rows"] * box["cols"] == 576 for box in boxes)
    assert all(box["left"] + box["width"] <= png.shape[1] for box in boxes)
    assert png.shape[1] > 6 * boxes[0]["width"]  # side by side
    lefts = [box["left"] for box in boxes]
    assert lefts == sorted(lefts) and len(set(np.diff(lefts))) == 1  # evenly spaced, no overlap
    assert "visionzip: 64 of 576" in stdout and "wrote" in stdout
    assert not list(out.parent.glob("*.tmp"))  # atomic: no temporary left


def test_written_files_get_a_new_files_permissions(tmp_path):
    """The PNG and the sidecar are written through a private temporary file, then renamed: they get a new file's
    usual mode (0666 less the umask), not the temporary file's 0600 (other users could not read the figure)."""
    import os
    import stat

    from pruner_core.viz_render import atomic_write

    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.png", lambda handle: handle.write(b"png"))
        os.umask(0o027)
        atomic_write(tmp_path / "b.json", lambda handle: handle.write("{}"), mode="w")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    assert (tmp_path / "a.png").read_bytes() == b"png" and (tmp_path / "b.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.json"]  # no temporary left


def test_outlines_in_the_pixels_match_the_selection(six_panels):
    out, sidecar, _ = six_panels
    png = read_rgb(out)
    for panel in sidecar["panels"]:
        cells = panel_cells(png, panel["box"])
        kept, pivots = outlined(cells, KEPT_RGB), outlined(cells, PIVOT_RGB)
        assert len(kept) + len(pivots) == panel["budget"] == 64, panel["method"]
        assert kept | pivots == set(panel["indices"]), panel["method"]
        assert pivots == set(panel["order"][: panel["pivots"]]), panel["method"]
        assert panel["pivots"] == (4 if panel["method"] in ("vlm_pruner", "dart") else 0)
        assert panel["indices"] == sorted(panel["indices"]) and sorted(panel["order"]) == panel["indices"]
        # discarded cells are dimmed everywhere: none reaches the brightness a dimmed 255 could have
        dropped = np.ones(cells.shape[:2], dtype=bool).reshape(-1)
        dropped[panel["indices"]] = False
        assert int(cells.reshape(-1, *cells.shape[2:])[dropped].max()) <= math.floor(255 * DIM)


def test_kept_cells_are_full_brightness_against_dimmed_ones(six_panels):
    """Where one panel keeps a patch another drops, the dropped copy is exactly the kept one dimmed."""
    out, sidecar, _ = six_panels
    png = read_rgb(out)
    depth = sidecar["panels"][0]["box"]["cell"] // 12 + 1  # just inside the outline
    rings = [inner_ring(panel_cells(png, panel["box"]), depth).reshape(576, -1, 3) for panel in sidecar["panels"]]
    compared = 0
    for a, panel_a in enumerate(sidecar["panels"]):
        for b, panel_b in enumerate(sidecar["panels"]):
            for token in set(panel_a["indices"]) - set(panel_b["indices"]):
                bright, dim = rings[a][token].astype(np.float64), rings[b][token].astype(np.float64)
                assert np.abs(np.floor(bright * DIM) - dim).max() <= 1, (panel_a["method"], token)
                compared += 1
    assert compared > 100


def test_sidecar_selection_is_the_model_path(six_panels, cache_dir):
    """The panels show what prefill_with_pruning selects on the same prompt (recomputed here, independently)."""
    _, sidecar, _ = six_panels
    model, processor = load_llava(cache_dir / "tiny-llava")
    inputs = processor(images=load_image("astronaut"), text=llava_prompt(sidecar["prompt"]), return_tensors="pt")
    with torch.no_grad():
        embeds, starts, n_image = embed_prompt(model, inputs["input_ids"], inputs["pixel_values"])
        for panel in sidecar["panels"][:4]:  # the four that need no vision-tower signal
            config = PrunerConfig(keep=64, method=panel["method"], layer=2)
            selection = prefill_with_pruning(model, embeds, int(starts[0]), n_image, image_grid(model.config),
                                             config).selection
            assert selection.order[0].tolist() == panel["order"], panel["method"]
    for panel in sidecar["panels"]:
        assert panel["coverage"] == coverage(panel["indices"], (24, 24)).to_dict()


def test_fewer_panels_make_a_narrower_png_and_a_second_grid(cache_dir, tmp_path, six_panels, capsys):
    out = tmp_path / "gqa.png"
    code = main(["--model", "tiny-llava-gqa", "--image", "chelsea", "--keep", "0.1", "--methods", "vlm_pruner,random",
                 "--layer", "1", "--out", str(out), "--cache-dir", str(cache_dir)])
    assert code == 0
    assert "random weights" in capsys.readouterr().out  # a tiny build says so
    png, sidecar = read_rgb(out), json.loads(out.with_suffix(".json").read_text())
    assert sidecar["grid"] == [16, 16]  # read from the model, not assumed
    assert png.shape[1] < read_rgb(six_panels[0]).shape[1]
    for panel in sidecar["panels"]:
        cells = panel_cells(png, panel["box"])
        assert panel["budget"] == round(256 * 0.1) == 26
        assert outlined(cells, KEPT_RGB) | outlined(cells, PIVOT_RGB) == set(panel["indices"])

    two = tmp_path / "two.png"
    model_pair = load_llava(cache_dir / "tiny-llava")
    result = visualize(VizOptions(methods=("vlm_pruner", "fastv"), out=two, cache_dir=cache_dir), loaded=model_pair)
    width_two, width_six = read_rgb(two).shape[1], read_rgb(six_panels[0]).shape[1]
    assert width_two < width_six
    assert width_six - width_two == 4 * (result.layout.boxes[1].left - result.layout.boxes[0].left)


# ---------------------------------------------------------------- errors name the problem and the fix


def run_main(argv: list[str], cache_dir: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv + ["--cache-dir", str(cache_dir)])
        except SystemExit as exit_:  # argparse's own usage errors (a --keep its type rejects)
            code = exit_.code
    return code, err.getvalue()


def test_unknown_method_lists_the_registered_ones(tmp_path, cache_dir):
    code, err = run_main(["--methods", "vlm_pruner,tome", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "unknown method 'tome'" in err
    assert all(name in err for name in method_names())
    assert not (tmp_path / "v.png").exists()


def test_bad_images(tmp_path, cache_dir):
    code, err = run_main(["--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "not found" in err and "astronaut" in err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, err = run_main(["--image", str(text), "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and f"cannot read image file {text}: not an image" in err
    bomb = write_bomb_png(tmp_path / "bomb.png")
    code, err = run_main(["--image", str(bomb), "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and f"cannot read image file {bomb}: its header declares more pixels" in err
    assert "Traceback" not in err
    with pytest.raises(VizError, match="directory"):
        load_image(str(tmp_path))


def test_keep_and_layer_out_of_range(tmp_path, cache_dir):
    code, err = run_main(["--keep", "577", "--methods", "random", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "577" in err and "576 image tokens" in err
    code, err = run_main(["--keep", "0", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "keep" in err
    code, err = run_main(["--keep", "1.5", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "fraction" in err
    code, err = run_main(["--layer", "9", "--methods", "random", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "decoder layers" in err
    assert not list(tmp_path.glob("*.png"))


def test_unwritable_out_and_bad_out_names(tmp_path, cache_dir):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, err = run_main(["--out", str(blocker / "viz.png")], cache_dir)
    assert code == 2 and "cannot write" in err and "--out" in err
    code, err = run_main(["--out", str(tmp_path / "viz.jpg")], cache_dir)
    assert code == 2 and ".png" in err
    (tmp_path / "dir.png").mkdir()
    code, err = run_main(["--out", str(tmp_path / "dir.png"), "--methods", "random"], cache_dir)
    assert code == 2 and "is a directory" in err


def test_console_script_reports_errors_without_a_traceback(tmp_path):
    script = Path(sys.executable).with_name("pruner-viz")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pruner_core.viz"]
    done = subprocess.run(command + ["--methods", "nope", "--out", str(tmp_path / "v.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pruner-viz: error: unknown method 'nope'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- Qwen2-VL: the merged grid at the export resolution


@pytest.fixture(scope="session")
def qwen_panels(cache_dir, tmp_path_factory):
    """pruner-viz on tiny-qwen2-vl with the default methods (VisionZip cannot run: left out with a note), and once
    more with --authors-grid -> {authors_grid: (png path, sidecar dict, stdout)}."""
    runs = {}
    for authors in (False, True):
        out = tmp_path_factory.mktemp("viz-qwen") / "viz.png"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["--model", "tiny-qwen2-vl", "--image", "astronaut", "--keep", "24", "--out", str(out),
                         "--cache-dir", str(cache_dir), *(["--authors-grid", "--methods", "vlm_pruner"] if authors
                                                          else [])])
        assert code == 0
        runs[authors] = out, json.loads(out.with_suffix(".json").read_text()), stdout.getvalue()
    return runs


def test_qwen_panels_are_the_merged_grid_on_the_resized_photograph(qwen_panels, cache_dir):
    """Tiny Qwen2-VL (224 x 336 px): an 8 x 12 grid of merged tokens, 28 x 28 px each; kept cells show the
    photograph resized to the export size (the processor's bicubic resize), outlines match the selection."""
    from pruner_core.adapters.qwen2_vl_inputs import default_image_size

    out, sidecar, stdout = qwen_panels[False]
    height, width = default_image_size(cache_dir / "tiny-qwen2-vl")
    assert sidecar["grid"] == [height // 28, width // 28] and sidecar["patch_px"] == 28
    assert [panel["method"] for panel in sidecar["panels"]] == ["vlm_pruner", "dart", "divprune", "fastv", "random"]
    assert "note: visionzip left out" in stdout and "[CLS]" in stdout and "random weights" in stdout
    resized = np.asarray(load_image("astronaut").resize((width, height), Image.Resampling.BICUBIC))
    # each merged token's 28 x 28 pixels: [rows, cols, 28, 28, 3]
    expected = resized.reshape(height // 28, 28, width // 28, 28, 3).transpose(0, 2, 1, 3, 4)
    png = read_rgb(out)
    for panel in sidecar["panels"]:
        cells = panel_cells(png, panel["box"])
        assert panel["box"]["cell"] == 28 and panel["pivots"] == (4 if panel["method"] in ("vlm_pruner", "dart") else 0)
        assert outlined(cells, KEPT_RGB) | outlined(cells, PIVOT_RGB) == set(panel["indices"]), panel["method"]
        rings, photo = inner_ring(cells, 3), inner_ring(expected, 3)  # [rows, cols, P, 3]
        kept = np.zeros(cells.shape[:2], dtype=bool).reshape(-1)
        kept[panel["indices"]] = True
        assert np.array_equal(rings.reshape(kept.size, -1, 3)[kept], photo.reshape(kept.size, -1, 3)[kept])
        assert panel["coverage"] == coverage(panel["indices"], tuple(sidecar["grid"])).to_dict()


def test_qwen_panels_are_the_model_path(qwen_panels, cache_dir):
    """The panels' picks equal the adapter's prefill_with_pruning on the processor's own inputs (its prompt ids,
    pixels and the stock M-RoPE positions), with and without the authors' grid placement."""
    from pruner_core.adapters import QWEN2_VL, load_qwen2_vl, qwen_prompt
    from pruner_core.adapters.qwen2_vl import merged_grid, rope_positions

    model, processor = load_qwen2_vl(cache_dir / "tiny-qwen2-vl")
    for authors, (_, sidecar, _) in qwen_panels.items():
        inputs = processor(images=load_image("astronaut"), text=qwen_prompt(sidecar["prompt"]))
        ids, grid_thw = inputs["input_ids"], inputs["image_grid_thw"]
        assert sidecar["authors_grid"] is authors
        with torch.no_grad():
            embeds, starts, n_image = QWEN2_VL.embed_prompt(model, ids, inputs["pixel_values"], grid_thw)
            positions, _ = rope_positions(model, ids, inputs["mm_token_type_ids"], grid_thw)
            for panel in sidecar["panels"]:
                config = PrunerConfig(keep=24, method=panel["method"], layer=2, authors_grid=authors)
                selection = QWEN2_VL.prefill_with_pruning(model, embeds, int(starts[0]), n_image, merged_grid(grid_thw),
                                                          config, position_ids=positions).selection
                assert selection.order[0].tolist() == panel["order"], (panel["method"], authors)
    assert qwen_panels[True][1]["panels"][0]["order"] != qwen_panels[False][1]["panels"][0]["order"]


def test_qwen_and_llava_refusals(tmp_path, cache_dir):
    """VisionZip named for a Qwen2-VL model, and --authors-grid for LLaVA-1.5, are clear errors (no PNG)."""
    code, err = run_main(["--model", "tiny-qwen2-vl", "--methods", "vlm_pruner,visionzip", "--keep", "8",
                          "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "visionzip" in err and "[CLS]" in err and "drop it from --methods" in err
    code, err = run_main(["--authors-grid", "--methods", "random", "--out", str(tmp_path / "v.png")], cache_dir)
    assert code == 2 and "drop authors_grid" in err and "LLaVA-1.5" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))
