"""Fine-tuning data: the official sampling rules (spec 7.2), crop, captions, robustness, workers."""
import json
import logging
import re
import time
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tora.config import ConfigError, DataParams, load_config
from tora.data import (DataError, SFTDataset, UnusableClip, find_clips, pad_with_last_frame,
                       resize_center_crop, sample_frame_indices, to_model_range)
from tora.video_io import write_mp4

OFFICIAL_EXAMPLES = Path("/work/shared/data/training_examples")
PROJECT_EXAMPLES = Path(__file__).resolve().parents[1] / "training_examples"
CLIP_HEIGHT, CLIP_WIDTH = 16, 32  # decord mis-decodes some small widths (e.g. 48); 32 is safe


def small_params(**overrides) -> DataParams:
    """Official sampling settings at the clips' own size (no resize)."""
    return DataParams(**{"video_size": [CLIP_HEIGHT, CLIP_WIDTH], **overrides})


def index_coded_frames(num_frames: int) -> np.ndarray:
    """uint8 [F, H, W, 3] flat frames whose colour encodes the frame index (robust to the codec)."""
    index = np.arange(num_frames)
    colour = np.stack([index % 16 * 16 + 8, index // 16 * 16 + 8, np.full(num_frames, 128)], axis=1)
    shape = (num_frames, CLIP_HEIGHT, CLIP_WIDTH, 3)
    return np.broadcast_to(colour[:, None, None, :], shape).astype(np.uint8)


def frame_indices_of(video: torch.Tensor) -> list[int]:
    """Inverse of index_coded_frames for an item's mp4 [F, 3, H, W] in [-1, 1]."""
    mean_rgb = (video * 127.5 + 127.5).mean(dim=(2, 3))  # [F, 3]
    low, high = ((mean_rgb[:, :2] - 8) / 16).round().long().unbind(1)
    return (high * 16 + low).tolist()


def write_clip(path: Path, num_frames: int, fps: float) -> None:
    write_mp4(path, index_coded_frames(num_frames), fps)


def make_data_dir(root: Path, clips: dict[str, tuple[int, float]]) -> Path:
    """``root/videos/<name>.mp4`` (index-coded, (frames, fps)) with captions "caption of <name>"."""
    for name, (num_frames, fps) in clips.items():
        write_clip(root / "videos" / f"{name}.mp4", num_frames, fps)
        label = root / "labels" / f"{name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(f"caption of {name}\n")
    return root


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def warnings_about(caplog, text: str) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [message for message in messages if text in message]


# ----------------------------------------------------------------------------------------------
# Sampling rules (pure)
# ----------------------------------------------------------------------------------------------

def indices(num_frames: int, fps: float, seed: int = 0, **overrides) -> list[int]:
    rng = np.random.default_rng(seed)
    return sample_frame_indices(num_frames, fps, small_params(**overrides), rng)


@pytest.mark.parametrize("num_frames, fps, step, last_start", [
    (60, 8, 1, 8),      # same rate: 49 consecutive frames of a random window
    (56, 8, 1, 4),      # (56-6)/8*8 = 50 > 49: just case (a)
    (120, 16, 2, 19),   # span 98, every 2nd frame
    (160, 24, 3, 10),   # span 147, every 3rd frame
    (100, 12, 1, 24),   # span 73 // 49 = step 1: the item runs at 12 fps, not 8 (official quirk)
])
def test_case_a_random_window_with_integer_step(num_frames, fps, step, last_start):
    starts = set()
    for seed in range(200):
        picked = indices(num_frames, fps, seed)
        assert len(picked) == 49
        assert np.all(np.diff(picked) == step)
        starts.add(picked[0])
    assert starts == set(range(3, last_start + 1))  # uniform over every window inside the skips
    assert indices(num_frames, fps, seed=7) == indices(num_frames, fps, seed=7)  # seeded


@pytest.mark.parametrize("num_frames, fps, expected", [
    (56, 4, list(range(3, 52))),           # source below 8 fps: never case (a)
    (56, 24, list(range(3, 52))),          # 2.1 s at 24 fps: too short for (a), 50 frames > 49
    (150, 24, list(range(3, 101, 2))),     # 144/24*8 = 48 <= 49 -> (b) with step 144 // 49 = 2
    (200, 4, list(range(3, 3 + 49 * 3, 3))),  # (b) step 194 // 49 = 3 (1.3 fps effective)
])
def test_case_b_spreads_over_the_clip(num_frames, fps, expected):
    assert indices(num_frames, fps, seed=1) == expected == indices(num_frames, fps, seed=2)


@pytest.mark.parametrize("num_frames, fps", [(55, 8), (55, 24), (49, 8), (30, 30), (7, 8)])
def test_case_c_longest_4k_plus_1_run(num_frames, fps):
    usable = num_frames - 6
    run = max(n for n in range(1, usable + 1) if n % 4 == 1)
    assert indices(num_frames, fps) == list(range(3, 3 + run))


def test_case_c_every_length_gives_4k_plus_1_frames():
    for num_frames in range(7, 56):
        picked = indices(num_frames, 8)
        assert len(picked) % 4 == 1 and num_frames - 6 - 4 < len(picked) <= num_frames - 6


def test_shipped_example_length_gives_41_frames():
    assert len(indices(49, 8)) == 41  # the official 49-frame examples: 41 real + 8 padded


def test_too_short_clips_are_unusable():
    with pytest.raises(UnusableClip, match="too short"):
        indices(6, 8)  # nothing left after skipping 3 + 3
    with pytest.raises(UnusableClip, match="min_num_frames"):
        indices(14, 8, min_num_frames=9)  # 8 usable -> a run of 5
    assert len(indices(15, 8, min_num_frames=9)) == 9


def test_other_frame_counts_and_skips():
    tiny = dict(max_num_frames=9, skip_frms_num=0.0)
    starts = {indices(40, 8, seed, **tiny)[0] for seed in range(300)}
    assert starts == set(range(0, 32))  # (a): windows of 9 anywhere in 40 frames
    assert indices(12, 4, **tiny) == list(range(9))  # (b): step 12 // 9 = 1
    assert indices(8, 8, **tiny) == list(range(5))  # (c): 8 -> 5


def test_padding_repeats_the_last_frame():
    frames = torch.arange(3).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    padded = pad_with_last_frame(frames, 7)
    assert padded.shape == (7, 3, 2, 2)
    assert padded[:, 0, 0, 0].tolist() == [0, 1, 2, 2, 2, 2, 2]
    assert torch.equal(pad_with_last_frame(frames, 3), frames)


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------

def test_wide_frames_keep_the_centre_columns():
    frames = torch.randint(0, 256, (2, 3, 16, 48), dtype=torch.uint8)
    cropped = resize_center_crop(frames, (16, 24))  # height fits already: only the sides go
    assert torch.equal(cropped, frames[..., 12:36])


def test_tall_frames_are_resized_to_the_width_and_keep_the_middle_rows():
    frames = torch.zeros(1, 3, 64, 32, dtype=torch.uint8)
    frames[..., 16:48, :] = 200  # the middle half; the target keeps rows 8..40 of the 48-row resize
    cropped = resize_center_crop(frames, (16, 24))
    assert cropped.shape == (1, 3, 16, 24)
    assert torch.all(cropped == 200)


def test_resize_preserves_the_aspect_before_cropping():
    frames = torch.zeros(1, 3, 32, 64, dtype=torch.uint8)
    frames[..., :, 16:48] = 255  # a centred box half the width
    resized = resize_center_crop(frames, (8, 16))  # exact 4x downscale, nothing cropped
    assert resized.shape == (1, 3, 8, 16)
    assert torch.all(resized[..., 5:11] == 255) and torch.all(resized[..., :3] == 0)


def test_model_range():
    values = to_model_range(torch.tensor([0, 255, 51], dtype=torch.uint8))
    assert values.dtype == torch.float32
    assert values.tolist() == pytest.approx([-1.0, 1.0, (51 - 127.5) / 127.5])


# ----------------------------------------------------------------------------------------------
# Items from real files
# ----------------------------------------------------------------------------------------------

def test_item_of_a_long_clip(tmp_path):
    dataset = SFTDataset(make_data_dir(tmp_path, {"long": (120, 16)}), small_params(), seed=5)
    item = dataset[0]
    assert item["mp4"].shape == (49, 3, CLIP_HEIGHT, CLIP_WIDTH)
    assert item["mp4"].dtype == torch.float32
    assert item["mp4"].min() >= -1 and item["mp4"].max() <= 1
    assert item["txt"] == "caption of long" and item["num_frames"] == 49 and item["fps"] == 8.0
    picked = frame_indices_of(item["mp4"])
    assert np.all(np.diff(picked) == 2) and 3 <= picked[0] <= 19  # case (a) at 16 fps, decoded


def test_item_of_a_short_clip_is_padded(tmp_path):
    dataset = SFTDataset(make_data_dir(tmp_path, {"short": (20, 8)}), small_params())
    item = dataset[0]
    assert item["num_frames"] == 13  # 14 usable frames -> 4k+1 = 13
    assert frame_indices_of(item["mp4"]) == list(range(3, 16)) + [15] * 36
    assert torch.equal(item["mp4"][13:], item["mp4"][12:13].expand(36, -1, -1, -1))


def test_items_resize_to_the_configured_size(tmp_path):
    dataset = SFTDataset(make_data_dir(tmp_path, {"clip": (30, 8)}), DataParams(video_size=[8, 10]))
    assert dataset[0]["mp4"].shape == (49, 3, 8, 10)


def test_randomness_is_a_function_of_seed_epoch_and_index(tmp_path):
    data_dir = make_data_dir(tmp_path, {"a": (80, 8), "b": (80, 8)})
    first = SFTDataset(data_dir, small_params(), seed=3)
    again = SFTDataset(data_dir, small_params(), seed=3)
    starts = []
    for epoch in range(6):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        item = first[1]
        assert torch.equal(item["mp4"], again[1]["mp4"])  # another process / a resumed run
        starts.append(frame_indices_of(item["mp4"])[0])
    assert len(set(starts)) > 1  # a new window every epoch


# ----------------------------------------------------------------------------------------------
# Folders and captions
# ----------------------------------------------------------------------------------------------

def touch(path: Path, text: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text) if text is not None else path.write_bytes(b"")


def test_captions_pair_by_relative_path(tmp_path, caplog):
    root = tmp_path / "my_videos"  # "videos" inside the data folder's own name
    touch(root / "videos" / "a" / "b" / "clip.mp4")
    touch(root / "labels" / "a" / "b" / "clip.txt", "first line\nsecond line\n")
    touch(root / "videos" / "videos" / "x.mp4")  # a sub-folder called videos
    touch(root / "labels" / "videos" / "x.txt", "nested videos folder\n")
    touch(root / "videos" / "take.mp4.mp4")
    touch(root / "labels" / "take.mp4.txt", "double suffix\n")
    touch(root / "videos" / "empty.mp4")
    touch(root / "labels" / "empty.txt", "")
    touch(root / "videos" / "orphan.mp4")
    touch(root / "videos" / "notes.txt", "not a clip")
    with caplog.at_level(logging.WARNING):
        clips = find_clips(root)
    captions = {clip.video.relative_to(root / "videos").as_posix(): clip.caption for clip in clips}
    assert captions == {"a/b/clip.mp4": "first line", "videos/x.mp4": "nested videos folder",
                        "take.mp4.mp4": "double suffix", "empty.mp4": "", "orphan.mp4": ""}
    [warning] = warnings_about(caplog, "no caption")
    assert "1 of 5" in warning and "orphan.txt" in warning


def test_several_data_folders_are_concatenated(tmp_path):
    first = make_data_dir(tmp_path / "one", {"a": (20, 8), "b": (20, 8)})
    second = make_data_dir(tmp_path / "two", {"c": (20, 8)})
    dataset = SFTDataset([first, str(second)], small_params())
    assert len(dataset) == 3
    assert [dataset[i]["txt"] for i in range(3)] == ["caption of a", "caption of b", "caption of c"]


def test_folder_without_clips_is_an_error(tmp_path):
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))}.*no 'videos' folder"):
        SFTDataset(tmp_path, small_params())
    touch(tmp_path / "videos" / "readme.txt", "no clips here")
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))} has no .mp4"):
        SFTDataset(tmp_path, small_params())


# ----------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------

def test_corrupt_and_short_clips_are_replaced_with_one_warning(tmp_path, caplog):
    data_dir = make_data_dir(tmp_path, {"good": (30, 8), "short": (5, 8)})
    write_garbage(data_dir / "videos" / "broken.mp4")
    dataset = SFTDataset(data_dir, small_params())
    names = [clip.video.stem for clip in dataset.clips]  # sorted: broken, good, short
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert dataset[names.index("broken")]["txt"] == "caption of good"
            assert dataset[names.index("short")]["txt"] == "caption of good"
    [broken] = warnings_about(caplog, "broken.mp4")
    [short] = warnings_about(caplog, "short.mp4")
    assert "cannot open" in broken and "too short" in short


def test_a_corrupt_clip_prints_the_project_warning_only(tmp_path, capfd, caplog):
    """decord and ffmpeg print their own lines about an unreadable file on the process's stderr; the
    project's one warning names the clip, so theirs are silenced."""
    data_dir = make_data_dir(tmp_path, {"good": (30, 8)})
    write_garbage(data_dir / "videos" / "broken.mp4")
    dataset = SFTDataset(data_dir, small_params())
    broken = [clip.video.stem for clip in dataset.clips].index("broken")
    with caplog.at_level(logging.WARNING):
        assert dataset[broken]["txt"] == "caption of good"
    printed = capfd.readouterr()
    assert "moov atom" not in printed.err and "video_reader.cc" not in printed.err, printed.err
    assert "cannot open" in warnings_about(caplog, "broken.mp4")[0]


def test_all_bad_folder_is_a_clear_error(tmp_path, caplog):
    for name in "abc":
        write_garbage(tmp_path / "videos" / f"{name}.mp4")
    dataset = SFTDataset(tmp_path, small_params())
    with caplog.at_level(logging.WARNING), pytest.raises(
            DataError, match=f"no usable clip in {re.escape(str(tmp_path))}"):
        dataset[0]
    assert len(warnings_about(caplog, "skipping")) == 3
    with pytest.raises(DataError, match="no usable clip"):  # known-bad clips: no new attempts
        dataset[1]


def test_retries_are_bounded(tmp_path, caplog):
    for i in range(30):
        write_garbage(tmp_path / "videos" / f"{i:02d}.mp4")
    dataset = SFTDataset(tmp_path, small_params(max_retries=2))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="max_retries = 2"):
        dataset[0]
    assert time.monotonic() - started < 5
    assert len(warnings_about(caplog, "skipping")) == 3  # the clip itself + 2 replacements


def test_dataloader_with_two_workers(tmp_path):
    data_dir = make_data_dir(tmp_path, {"a": (70, 8), "b": (90, 12), "c": (20, 8)})
    write_garbage(data_dir / "videos" / "d.mp4")
    dataset = SFTDataset(data_dir, small_params(), seed=11)
    dataset.set_epoch(2)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert [batch["mp4"].shape for batch in batches] == [(2, 49, 3, CLIP_HEIGHT, CLIP_WIDTH)] * 2
    captions = sum((batch["txt"] for batch in batches), [])
    assert captions[:3] == ["caption of a", "caption of b", "caption of c"]
    assert captions[3] in captions[:3]  # the corrupt clip d was replaced
    in_process = torch.stack([dataset[i]["mp4"] for i in range(4)])
    assert torch.equal(torch.cat([batch["mp4"] for batch in batches]), in_process)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

def test_config_takes_the_official_data_block(tmp_path):
    yaml = tmp_path / "train.yaml"
    yaml.write_text("data:\n  target: data_video.SFTDataset\n  params:\n"
                    "    video_size: [480, 720]\n    fps: 8\n    max_num_frames: 49\n"
                    "    skip_frms_num: 3.\n")  # the official train yaml
    cfg = load_config([yaml], overrides=["data.params.video_size=[64,96]"])
    assert cfg.data.params.video_size == [64, 96] and cfg.data.params.skip_frms_num == 3.0
    assert cfg.data.params == load_config(overrides=["data.params.video_size=[64,96]"]).data.params
    with pytest.raises(ConfigError, match="data.params.max_retry"):
        load_config(overrides=["data.params.max_retry=3"])
    with pytest.raises(ConfigError, match="unsupported target"):
        load_config(extra={"data": {"target": "my.Dataset"}})


@pytest.mark.parametrize("key, value", [("max_num_frames", 48), ("skip_frms_num", 2.5),
                                        ("video_size", [16]), ("min_num_frames", 50),
                                        ("max_retries", -1)])
def test_invalid_data_settings_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"data.params.{key}"):
        SFTDataset(tmp_path, small_params(**{key: value}))


# ----------------------------------------------------------------------------------------------
# Example folders
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not OFFICIAL_EXAMPLES.is_dir(), reason="official training examples not present")
def test_official_examples_load():
    dataset = SFTDataset(OFFICIAL_EXAMPLES, DataParams(video_size=[48, 72]))
    assert len(dataset) == 2
    for i, clip in enumerate(dataset.clips):
        item = dataset[i]
        assert item["mp4"].shape == (49, 3, 48, 72)
        assert item["num_frames"] == 41  # 49 frames at 8 fps -> case (c)
        assert torch.equal(item["mp4"][41:], item["mp4"][40:41].expand(8, -1, -1, -1))
        label = OFFICIAL_EXAMPLES / "labels" / f"{clip.video.stem}.txt"
        assert item["txt"] == label.read_text().splitlines()[0] != ""


def test_project_examples_load_and_match_their_ground_truth():
    dataset = SFTDataset(PROJECT_EXAMPLES, DataParams(video_size=[48, 72]))
    assert len(dataset) == 6
    for i, clip in enumerate(dataset.clips):
        item = dataset[i]
        assert item["mp4"].shape == (49, 3, 48, 72) and item["txt"]
        truth = json.loads(clip.video.with_suffix(".json").read_text())
        reader = decord.VideoReader(str(clip.video))
        assert len(reader) == truth["num_frames"] and reader.get_avg_fps() == truth["fps"]
        middle = truth["num_frames"] // 2
        frame = reader[middle].asnumpy().astype(int)  # [H, W, 3]
        for obj in truth["objects"]:
            x, y = np.rint(obj["centres"][middle]).astype(int)
            assert np.abs(frame[y, x] - obj["color"]).max() < 20, (clip.video, obj["name"])
