"""Synthetic moving-object clips: determinism, geometry, captions, disjoint held-out seeds, file formats."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tora.config import DataParams
from tora.data import SFTDataset
from tora.moving_objects import (BACKGROUNDS, PALETTE, SHAPES, SPLITS, GeneratorConfig, MovingObjectsError,
                                 Sprite, caption_colours, clip_rng, coverage, fit_inside, held_out_clip,
                                 pixel_grid, random_clip, read_ground_truth, render_clip, to_canvas,
                                 trajectory_groups)
from tora.trajectory import load_tracks
from tora.video_io import read_mp4

REPO = Path(__file__).resolve().parents[1]
CFG = GeneratorConfig()


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator_script():
    return load_script("make_moving_objects")


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, generator_script):
    out = tmp_path_factory.mktemp("train")
    generator_script.main(["--out", str(out), "--num-clips", "4", "--seed", "7", "--workers", "2"])
    return out


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory, generator_script):
    out = tmp_path_factory.mktemp("held_out")
    generator_script.main(["--out", str(out), "--held-out", "--num-clips", "3"])
    return out


# ----------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------

def test_same_seed_same_clip_and_other_seed_other_clip():
    first, again = random_clip("train", 3, 5, CFG), random_clip("train", 3, 5, CFG)
    np.testing.assert_array_equal(first.centres, again.centres)
    np.testing.assert_array_equal(render_clip(first), render_clip(again))
    assert first.caption == again.caption
    assert not np.array_equal(random_clip("train", 4, 5, CFG).centres[0], first.centres[0])


def test_workers_do_not_change_the_files(train_dir, generator_script, tmp_path):
    generator_script.main(["--out", str(tmp_path), "--num-clips", "4", "--seed", "7", "--workers", "1"])
    names = sorted(p.name for p in (train_dir / "videos").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "videos").iterdir()) and len(names) == 8
    for name in names:
        a, b = train_dir / "videos" / name, tmp_path / "videos" / name
        if name.endswith(".json"):
            assert a.read_bytes() == b.read_bytes()
        else:  # x264 is deterministic single-threaded; compare pixels to be independent of muxer details
            np.testing.assert_array_equal(read_mp4(a), read_mp4(b))
    for label in (train_dir / "labels").iterdir():
        assert label.read_bytes() == (tmp_path / "labels" / label.name).read_bytes()


def test_objects_stay_inside_the_frame_apart_and_within_the_speed_limit():
    counts = set()
    for index in range(40):
        clip = random_clip("train", 0, index, CFG)
        counts.add(len(clip.sprites))
        assert clip.centres.shape == (len(clip.sprites), CFG.num_frames, 2)
        for sprite, track in zip(clip.sprites, clip.centres):
            assert (track - sprite.extent >= 0).all(), (index, sprite)
            assert (track[:, 0] + sprite.extent <= CFG.width - 1).all() and \
                   (track[:, 1] + sprite.extent <= CFG.height - 1).all(), (index, sprite)
            assert np.linalg.norm(np.diff(track, axis=0), axis=1).max() <= CFG.max_step + 1e-6
        for i in range(len(clip.sprites)):
            for j in range(i + 1, len(clip.sprites)):
                gap = np.linalg.norm(clip.centres[i] - clip.centres[j], axis=1).min()
                assert gap >= clip.sprites[i].extent + clip.sprites[j].extent + CFG.min_gap
    assert counts == {1, 2, 3}


def test_rendered_object_has_its_colour_at_the_centre_and_background_at_the_border():
    clip = random_clip("train", 0, 2, CFG)
    frames = render_clip(clip)
    for sprite, track in zip(clip.sprites, clip.centres):
        x, y = np.rint(track[10]).astype(int)
        assert np.abs(frames[10, y, x].astype(int) - sprite.color).max() <= 255 * CFG.shading
    border = np.concatenate([edge.reshape(-1, 3) for edge in (frames[:, 0], frames[:, -1], frames[:, :, 0],
                                                               frames[:, :, -1])])
    assert np.abs(border.astype(int) - BACKGROUNDS[clip.background_name]).max() <= CFG.texture_amplitude + 1


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_and_centroid(shape):
    """Coverage integrates to the shape's area and its centroid is the centre (what the colour tracker measures)."""
    sprite = Sprite("red " + shape, shape, 12.0, PALETTE["red"], rotation=0.4)
    grid_y, grid_x = pixel_grid(64, 64)
    alpha = coverage(sprite, (31.3, 30.6), (grid_y, grid_x))
    area = {"disc": np.pi * 144, "square": 24 * 24, "triangle": 3 * np.sqrt(3) / 4 * 144,
            "star": 5 * 144 * 0.45 * np.sin(2 * np.pi / 10)}[shape]  # star: 10 triangles centre-outer-inner
    assert alpha.sum() == pytest.approx(area, rel=0.02)
    centroid = [(alpha * grid_x).sum() / alpha.sum(), (alpha * grid_y).sum() / alpha.sum()]
    np.testing.assert_allclose(centroid, [31.3, 30.6], atol=0.05)


def test_captions_name_the_objects_in_order():
    for index in range(10):
        clip = random_clip("train", 1, index, CFG)
        assert caption_colours(clip.caption) == [sprite.name.split()[0] for sprite in clip.sprites]
        for sprite in clip.sprites:
            assert sprite.name in clip.caption
        assert f"{clip.background_name}" in clip.caption and clip.caption.endswith("background")
    assert caption_colours("an orange star, a red disc and a blue square on a navy background") == \
        ["orange", "red", "blue"]


def test_palette_is_separable_and_backgrounds_never_collide():
    palette = np.array(list(PALETTE.values()), float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 80
    backgrounds = np.array(list(BACKGROUNDS.values()), float)
    assert np.linalg.norm(palette[:, None] - backgrounds[None], axis=-1).min() > 120
    for name in BACKGROUNDS:
        assert caption_colours(f"a {name} disc") == [] and not set(name.split()) & set(PALETTE)


def test_bad_settings_are_errors():
    with pytest.raises(MovingObjectsError, match="max_objects"):
        GeneratorConfig(max_objects=9).check()
    with pytest.raises(MovingObjectsError, match="even height"):
        GeneratorConfig(height=95).check()
    with pytest.raises(MovingObjectsError, match="unknown split"):
        clip_rng("test", 0, 0)


def test_fit_inside_shrinks_only_what_leaves_the_box():
    box = np.array([[10.0, 10.0], [50.0, 30.0]])
    inside = np.array([[12.0, 12.0], [40.0, 28.0]])
    np.testing.assert_array_equal(fit_inside(inside, box), inside)
    fitted = fit_inside(np.array([[0.0, 0.0], [100.0, 10.0]]), box)
    assert (fitted >= box[0]).all() and (fitted <= box[1]).all()
    assert fitted[1, 0] - fitted[0, 0] == pytest.approx(40.0)  # aspect kept: 100 x 10 -> 40 x 4
    assert fitted[1, 1] - fitted[0, 1] == pytest.approx(4.0)


# ----------------------------------------------------------------------------------------------
# Seeds of the held-out set
# ----------------------------------------------------------------------------------------------

def test_held_out_seeds_are_disjoint_from_training():
    assert len(set(SPLITS.values())) == len(SPLITS)
    train = {tuple(random_clip("train", seed, index, CFG).centres[0, 0]) for seed in (0, 1) for index in range(10)}
    held_out = {tuple(held_out_clip(index, seed, CFG).centres[0, 0]) for seed in (0, 1) for index in range(10)}
    assert not {tuple(np.rint(p)) for p in train} & held_out
    # the seed words differ in the split id, whatever seed and index are
    assert random_clip("train", 1, 0, CFG).seed != held_out_clip(0, 1, CFG).seed == [SPLITS["held_out"], 1, 0]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def test_training_folder_loads_through_the_data_loader(train_dir):
    dataset = SFTDataset(train_dir, DataParams(video_size=[CFG.height, CFG.width], max_num_frames=25,
                                               skip_frms_num=0))
    assert len(dataset) == 4
    for index, clip in enumerate(dataset.clips):
        item = dataset[index]
        assert item["mp4"].shape == (25, 3, CFG.height, CFG.width) and item["num_frames"] == 25
        truth = read_ground_truth(clip.video)
        assert item["txt"] == truth["caption"] and caption_colours(item["txt"])
        frame = (item["mp4"][12].permute(1, 2, 0).numpy() * 127.5 + 127.5)
        for obj in truth["objects"]:
            assert obj["centres"].shape == (25, 2)
            x, y = np.rint(obj["centres"][12]).astype(int)
            assert np.abs(frame[y, x] - obj["color"]).max() < 255 * CFG.shading + 15, obj["name"]
    truth = json.loads((train_dir / "videos" / "train_00000.json").read_text())
    assert list(truth)[:6] == ["fps", "num_frames", "height", "width", "convention", "objects"]
    assert json.loads((train_dir / "generator.json").read_text())["seed"] == 7


def test_ground_truth_errors_name_the_file(tmp_path):
    with pytest.raises(MovingObjectsError, match="no ground truth"):
        read_ground_truth(tmp_path / "x.mp4")
    (tmp_path / "x.json").write_text('{"num_frames": 3, "objects": [{"centres": [[1, 2]]}]}')
    with pytest.raises(MovingObjectsError, match="x.json: not a ground-truth file"):
        read_ground_truth(tmp_path / "x.mp4")


def test_canvas_points_map_back_to_every_pixel():
    grid = np.stack(np.meshgrid(np.arange(CFG.width), np.arange(CFG.height)), axis=-1).reshape(-1, 2)
    canvas = to_canvas(grid, (CFG.height, CFG.width))
    assert (canvas >= 0).all() and (canvas <= 255).all()
    np.testing.assert_array_equal(canvas * [CFG.width, CFG.height] // 256, grid)
    with pytest.raises(MovingObjectsError, match="canvas"):
        to_canvas(grid, (96, 320))


def test_held_out_folder_samples_its_paths_exactly(held_out_dir):
    manifest = json.loads((held_out_dir / "manifest.json").read_text())
    cases = manifest["cases"]
    groups = trajectory_groups(REPO / "trajs")
    assert len(cases) == 3 + len(groups)
    prompts = (held_out_dir / "prompts.txt").read_text().splitlines()
    i2v = (held_out_dir / "prompts_i2v.txt").read_text().splitlines()
    assert prompts == [case["caption"] for case in cases]
    for case, line in zip(cases, i2v):
        caption, image = line.split("@@")
        assert caption == case["caption"] and (held_out_dir / "images" / image).is_file()
        assert (held_out_dir / case["prompt_file"]).read_text() == caption + "\n"
        assert (held_out_dir / case["prompt_file_i2v"]).read_text() == line + "\n"
        requested = np.array(case["requested_pixels_xy"])
        assert requested.shape == (len(case["objects"]), 25, 2)
        # the point files through the sampler's own reader: exactly the requested pixels
        tracks = load_tracks([held_out_dir / p for p in case["point_files"]], 25, (CFG.height, CFG.width))
        np.testing.assert_array_equal(tracks.numpy(), requested)
        truth = read_ground_truth(held_out_dir / case["video"])
        np.testing.assert_array_equal(np.stack([o["centres"] for o in truth["objects"]]), requested)
    first = read_mp4(held_out_dir / cases[0]["video"])[0]
    from PIL import Image
    image = np.asarray(Image.open(held_out_dir / cases[0]["image"]))
    assert np.abs(image.astype(int) - first).mean() < 2  # the PNG is the clip's (uncompressed) first frame


def test_trajs_cases_follow_the_project_shapes(held_out_dir):
    cases = {c["name"]: c for c in json.loads((held_out_dir / "manifest.json").read_text())["cases"]}
    assert len(cases["trajs_two_objects"]["objects"]) == 2
    diagonal = np.array(cases["trajs_diagonal"]["requested_pixels_xy"][0])
    # trajs/diagonal.txt: (30, 220) -> (226, 36) on the canvas: left-bottom to right-top
    assert diagonal[0, 0] < diagonal[-1, 0] and diagonal[0, 1] > diagonal[-1, 1]
    pause = np.array(cases["trajs_pause"]["requested_pixels_xy"][0])
    assert (np.abs(np.diff(pause, axis=0)).sum(axis=1) == 0).sum() >= 3  # the file's pauses are kept


def test_training_examples_ground_truth_unchanged():
    """scripts/make_training_examples.py goes through the library writer: same json as committed."""
    script = load_script("make_training_examples")
    for clip in script.CLIPS:
        truth = script.ground_truth(clip.fps, script.HEIGHT, script.WIDTH,
                                    [script.sprite(obj) for obj in clip.objects], script.centres_of(clip),
                                    shapes=script.SHAPES)
        committed = REPO / "training_examples" / "videos" / f"{clip.name}.json"
        assert json.dumps(truth) + "\n" == committed.read_text(), clip.name
