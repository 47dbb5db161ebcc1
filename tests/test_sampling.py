"""sample_video.py end to end on tiny random-weight checkpoints (T2V, I2V, several trajectories,
stdin prompts, two torchrun ranks) and its bad-input messages."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import sample_video
from safetensors.torch import load_file

from tora.sampling import PromptError, read_prompt_file

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAJS = REPO.parent / "shared" / "data" / "trajs"
MODEL = REPO / "configs/tora/model"




def fast(ckpts: Path) -> list[str]:
    """Overrides: the tiny checkpoints of this session, 4 sampler steps, 3 latent frames (9 frames)."""
    return [f"model.conditioner_config.params.emb_models=[{{params: {{model_dir: {ckpts / 't5'}, max_length: 16}}}}]",
            f"model.first_stage_config.params.ckpt_path={ckpts / 'vae/3d-vae.pt'}",
            "model.sampler_config.params.num_steps=4",
            "model.sampler_config.params.guider_config.params.num_steps=4",
            "--sampling-num-frames", "3"]


def run(ckpts, tmp_path, *extra, variant="t2v", base=(), after=(), last=()):
    """sample_video.main on the tiny checkpoints; ``last``: tokens after fast()'s (they win)."""
    bases = [str(MODEL / "tora_tiny.yaml"), *base, str(REPO / "configs/tora/inference.yaml"), *after]
    if variant == "i2v":
        bases.insert(1, str(MODEL / "tora_tiny_i2v.yaml"))
    argv = ["--base", *bases, "--load", str(ckpts / variant), "--output-dir", str(tmp_path / "out"),
            *extra, *fast(ckpts), *last]
    sample_video.main(argv)
    return tmp_path / "out"


def prompts(tmp_path, *lines, name="prompts.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def read_video(path):
    return np.stack(imageio.mimread(path))


def test_text_to_video_with_two_trajectories(tiny_ckpts, tmp_path, capsys):
    file = prompts(tmp_path, "a red ball", "", "# a comment", "a blue car")
    out = run(tiny_ckpts, tmp_path, "--input-file", str(file),
              "--point_path", str(REPO / "trajs/two_objects_a.txt"), str(REPO / "trajs/two_objects_b.txt"))
    videos = sorted((out / "video").glob("*.mp4"))
    assert [v.name for v in videos] == ["0000_a_red_ball_seed1234.mp4", "0001_a_blue_car_seed1235.mp4"]
    frames = read_video(videos[0])
    assert frames.shape == (9, 96, 144, 3)
    assert not (out / "latents").exists()  # only written with --save-latents
    overlay = read_video(out / "traj_video" / videos[0].name)
    assert overlay.shape == frames.shape and np.abs(overlay.astype(int) - frames).mean() > 0.5
    points = json.loads((out / "traj" / "0000_a_red_ball_seed1234.json").read_text())
    assert np.array(points["points_xy"]).shape == (2, 9, 2)
    assert (out / "prompt" / "0001_a_blue_car_seed1235.txt").read_text() == "a blue car\n"
    # what made the video, beside it
    record = json.loads((out / "video" / "0001_a_blue_car_seed1235.json").read_text())
    assert (record["prompt"], record["seed"], record["prompt_source"]) == ("a blue car", 1235, f"{file}:4")
    assert [t["file"] for t in record["trajectories"]] == [str(REPO / "trajs/two_objects_a.txt"),
                                                             str(REPO / "trajs/two_objects_b.txt")]
    assert record["trajectories"][0]["points_xy_canvas"][0] == [
        int(v) for v in (REPO / "trajs/two_objects_a.txt").read_text().split()[0].split(",")]
    assert record["checkpoint"]["file"] == str(tiny_ckpts / "t2v" / "1" / "mp_rank_00_model_states.pt")
    assert record["config"]["model"]["sampler_config"]["params"]["num_steps"] == 4
    assert record["versions"]["torch"] == torch.__version__ and record["frames"] == 9
    # one progress bar per prompt, from the denoising steps through decoding and writing
    err = capsys.readouterr().err
    for stage in ("prompt 1 of 2", "prompt 2 of 2", "denoising", "decoding", "writing", "6/6"):
        assert stage in err, stage


def test_low_memory_recipe_with_tiled_vae_runs_end_to_end(tiny_ckpts, tmp_path):
    vae = "model.first_stage_config.params."
    tiles = [vae + "encode_tile_latent_size=8", vae + "encode_tile_overlap_latent=2",
             vae + "decode_tile_latent_size=8", vae + "decode_tile_overlap_latent=2", vae + "encode_chunk_frames=4"]
    out = run(tiny_ckpts, tmp_path, "--input-file", str(prompts(tmp_path, "a red ball")),
              "--point_path", str(REPO / "trajs/circle.txt"), *tiles,
              after=[str(REPO / "configs/tora/memory/8gb.yaml")])
    frames = read_video(out / "video" / "0000_a_red_ball_seed1234.mp4")
    assert frames.shape == (9, 96, 144, 3) and frames.std() > 0


def test_outputs_are_never_overwritten(tiny_ckpts, tmp_path):
    file = prompts(tmp_path, "a red ball")
    for _ in range(2):
        out = run(tiny_ckpts, tmp_path, "--input-file", str(file), "--point_path", str(REPO / "trajs/circle.txt"))
    names = sorted(p.name for p in (out / "video").glob("*.mp4"))
    assert names == ["0000_a_red_ball_seed1234-1.mp4", "0000_a_red_ball_seed1234.mp4"]
    # same seed, same inputs -> the same video
    assert np.array_equal(read_video(out / "video" / names[0]), read_video(out / "video" / names[1]))


def test_image_to_video(tiny_ckpts, tmp_path):
    file = prompts(tmp_path, "a ball rolls away@@ball.png")
    out = run(tiny_ckpts, tmp_path, "--image2video", "--img_dir", str(REPO / "assets/images"),
              "--input-file", str(file), "--point_path", str(REPO / "trajs/pause.txt"), variant="i2v")
    (video,) = (out / "video").glob("*.mp4")
    assert read_video(video).shape == (9, 96, 144, 3)


def test_prompts_from_stdin(tiny_ckpts, tmp_path, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("first prompt\nsecond prompt\n\n"))
    out = run(tiny_ckpts, tmp_path, "--input-type", "cli", "--point_path", str(REPO / "trajs/wave.txt"))
    assert sorted(p.name for p in (out / "prompt").iterdir()) == [
        "0000_first_prompt_seed1234.txt", "0001_second_prompt_seed1235.txt"]


def assert_same_latents(out_a, out_b, video_names):
    """Compare the sampled latents (the mp4s are lossy: a 1-level pixel difference can change the encoding)."""
    for name in video_names:
        stem = name.removesuffix(".mp4") + ".safetensors"
        a, b = load_file(out_a / "latents" / stem)["latents"], load_file(out_b / "latents" / stem)["latents"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def compare_two_ranks_with_one(tiny_ckpts, tmp_path, prompt_lines, *extra):
    """Sample with 2 torchrun ranks and with 1 process; same videos, same latents.  Returns rank logs."""
    file = prompts(tmp_path, *prompt_lines)
    args = ["--base", str(MODEL / "tora_tiny.yaml"), str(REPO / "configs/tora/inference.yaml"),
            "--load", str(tiny_ckpts / "t2v"), "--input-file", str(file),
            "--point_path", str(REPO / "trajs/circle.txt"), "args.save_latents=true", *fast(tiny_ckpts)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "sat"), os.environ.get("PYTHONPATH")])))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "sat/sample_video.py"), *args, *extra, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    sample_video.main([*args, "--output-dir", str(tmp_path / "one")])
    names = sorted(p.name for p in (tmp_path / "one" / "video").glob("*.mp4"))
    assert names == sorted(p.name for p in (tmp_path / "two" / "video").glob("*.mp4"))
    assert len(names) == len(prompt_lines)
    assert_same_latents(tmp_path / "one", tmp_path / "two", names)
    return two.stderr


def test_two_ranks_split_prompts_and_match_one_rank(tiny_ckpts, tmp_path):
    log = compare_two_ranks_with_one(tiny_ckpts, tmp_path, ["one", "two", "three"])
    assert "[rank 1] prompt 1 (seed 1235)" in log and "[rank 0] prompt 2 (seed 1236)" in log
    for noise in ("initializing model parallel", "Setting accelerator to CPU", "fallback to Pytorch checkpointing",
                  "torch.jit.script", "Loading weights"):  # the libraries' chatter stays below INFO
        assert noise not in log, noise


def test_cfg_parallel_on_two_ranks_matches_one_rank(tiny_ckpts, tmp_path):
    log = compare_two_ranks_with_one(tiny_ckpts, tmp_path, ["one", "two"], "acceleration.cfg_parallel=true")
    # both ranks work on every prompt (one CFG half each)
    assert "[rank 1] prompt 0 (seed 1234)" in log and "[rank 0] prompt 1 (seed 1235)" in log


# -- bad input ------------------------------------------------------------------------------

def expect_error(caplog, tiny_ckpts, tmp_path, message, *argv, variant="t2v"):
    caplog.clear()
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_ckpts, tmp_path, *argv, variant=variant)
    assert exit_info.value.code == 1
    assert message in caplog.text


def test_bad_inputs_are_explained(tiny_ckpts, tmp_path, caplog):
    good = prompts(tmp_path, "a red ball")
    circle = str(REPO / "trajs/circle.txt")
    expect_error(caplog, tiny_ckpts, tmp_path, "prompt file not found", "--input-file", str(tmp_path / "nope.txt"))
    bad_traj = tmp_path / "bad.txt"
    bad_traj.write_text("10,10\n20;30\n")
    expect_error(caplog, tiny_ckpts, tmp_path, f"{bad_traj}, line 2", "--input-file", str(good), "--point_path", str(bad_traj))
    expect_error(caplog, tiny_ckpts, tmp_path, "unknown config key 'model.sampler_config.params.stepz'",
                 "--input-file", str(good), "model.sampler_config.params.stepz=3")
    i2v = prompts(tmp_path, "a ball@@missing.png", name="i2v.txt")
    expect_error(caplog, tiny_ckpts, tmp_path, f"{i2v}:1: image not found", "--image2video", "--input-file",
                 str(i2v), "--point_path", circle, variant="i2v")
    expect_error(caplog, tiny_ckpts, tmp_path, "checkpoint not found", "--input-file", str(good), "--load",
                 str(tmp_path / "no_ckpt"))


def test_i2v_prompt_lines_need_an_image(tmp_path):
    file = prompts(tmp_path, "just a prompt")
    with pytest.raises(PromptError, match=f"{file}:1: image-to-video prompts must look like 'prompt@@image_name'"):
        read_prompt_file(file, image2video=True, img_dir=tmp_path)


# -- every input checked before any model is built (issue 14, defects 5, 8, 9) ----------------

@pytest.fixture
def no_models(monkeypatch):
    """Building a model fails the test: the errors below must come from the checks before it."""
    from tora.engine import ToraEngine

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")
    monkeypatch.setattr(ToraEngine, "from_config", classmethod(refuse))


def test_bad_inputs_are_refused_before_any_model_is_built(tiny_ckpts, tmp_path, caplog, no_models):
    good, circle = str(prompts(tmp_path, "a red ball")), str(REPO / "trajs/circle.txt")
    cases = [
        (["--sampling-num-frames", "4"], "--sampling-num-frames (args.sampling_num_frames) = 4 must be odd: it "
         "counts latent frames, and this model (model.network_config.params.num_frames = 25) takes 3 (9 frames), "
         "5 (17 frames), 7 (25 frames) with trajectories; leave it out for 7 (25 frames)"),
        (["--sampling-num-frames", "9"], "--sampling-num-frames (args.sampling_num_frames) = 9 is out of range"),
        (["--sampling-num-frames", "0"], "--sampling-num-frames (args.sampling_num_frames) = 0 is out of range"),
        (["model.network_config.params.latent_height=13"], "'model.network_config.params.latent_height' = 13: "
         "must be a positive multiple of the patch size 2"),
        (["model.network_config.params.latent_width=17"], "'model.network_config.params.latent_width' = 17"),
        (["model.first_stage_config.params.ckpt_path=/nowhere/3d-vae.pt"], "VAE checkpoint not found: /nowhere"),
        (["args.video_crf=60"], "'args.video_crf' = 60: libx264 quality must be in 0..51"),
        (["args.sampling_fps=0"], "'args.sampling_fps' = 0: the frame rate must be positive"),
        (["--seed", str(2**64)], f"--seed (args.seed) = {2**64} is out of range"),
    ]
    for extra, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_info:
            run(tiny_ckpts, tmp_path, "--input-file", good, "--point_path", circle, last=extra)
        assert exit_info.value.code == 1 and message in caplog.text, (extra, caplog.text)
    assert not (tmp_path / "out").exists()  # a refused run leaves no output folder


def test_bad_files_are_refused_before_any_model_is_built(tiny_ckpts, tmp_path, caplog, no_models):
    circle = str(REPO / "trajs/circle.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a red ball\nun caf\u00e9\n".encode("latin-1"))
    expect_error(caplog, tiny_ckpts, tmp_path, f"prompt file {latin}, line 2: not UTF-8 text",
                 "--input-file", str(latin), "--point_path", circle)
    broken = tmp_path / "images" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    i2v = prompts(tmp_path, "a ball@@broken.png", name="i2v.txt")
    expect_error(caplog, tiny_ckpts, tmp_path, f"{i2v}:1: cannot read image {broken}", "--image2video",
                 "--img_dir", str(broken.parent), "--input-file", str(i2v), "--point_path", circle, variant="i2v")
    bad_traj = tmp_path / "bad.txt"
    bad_traj.write_text("10,10\n20;30\n")
    expect_error(caplog, tiny_ckpts, tmp_path, f"{bad_traj}, line 2", "--input-file", str(latin),
                 "--point_path", str(bad_traj))  # trajectories are read before prompts
    image_line = prompts(tmp_path, "a ball@@ball.png", name="image_line.txt")
    expect_error(caplog, tiny_ckpts, tmp_path, f"{image_line}:1: the prompt names an image ('@@'), but this is "
                 "a text-to-video run: pass --image2video and stack configs/tora/model/cogvideox_5b_tora_i2v.yaml",
                 "--input-file", str(image_line), "--point_path", circle)
    expect_error(caplog, tiny_ckpts, tmp_path, "--image2video needs an image-to-video model config",
                 "--image2video", "--input-file", str(image_line), "--point_path", circle)


def test_output_folder_problems_are_refused_before_any_model_is_built(tiny_ckpts, tmp_path, caplog, no_models):
    from test_files import small_tmpfs
    good, circle = str(prompts(tmp_path, "a red ball")), str(REPO / "trajs/circle.txt")
    a_file = tmp_path / "out"
    a_file.write_text("")
    expect_error(caplog, tiny_ckpts, tmp_path, f"output folder (--output-dir) {a_file} is a file, not a folder",
                 "--input-file", good, "--point_path", circle)
    a_file.unlink()
    with small_tmpfs(tmp_path / "out" / "video", options=",ro") as video:  # a read-only out/video
        expect_error(caplog, tiny_ckpts, tmp_path, f"cannot write to output folder (--output-dir) {video}: "
                     "Read-only file system", "--input-file", good, "--point_path", circle)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["video"]  # nothing else left behind
        assert list(video.iterdir()) == []


# -- one sample's files appear together or not at all (issue 14, defects 4, 6) -----------------

def fake_generation(frames=(9, 32, 48)):
    from tora.engine import Generation
    pixels = np.random.default_rng(0).integers(0, 256, (*frames, 3), dtype=np.uint8)
    tracks = torch.zeros(1, frames[0], 2, dtype=torch.int64)
    return Generation(pixels, torch.zeros(1, 3, 16, 4, 6), tracks)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_failing_encoder_leaves_no_output_of_the_sample(tmp_path, monkeypatch):
    from tora import video_io
    from tora.files import OutputError
    from tora.sampling import OutputWriter, PromptSpec
    writer = OutputWriter(tmp_path, fps=8, crf=18)
    monkeypatch.setattr(video_io.imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
    with pytest.raises(OutputError, match="ffmpeg failed"):
        writer.write(PromptSpec(0, "a ball"), 1, fake_generation(), ["t.txt"], {"seed": 1})
    assert files_under(tmp_path) == []  # no prompt/<name>.txt alone, no empty traj/<name>.json


def test_a_full_disk_leaves_no_output_of_the_sample(tmp_path):
    from test_files import small_tmpfs
    from tora.files import OutputError
    from tora.sampling import OutputWriter, PromptSpec
    with small_tmpfs(tmp_path / "disk", size="64k") as disk:
        writer = OutputWriter(disk, fps=8, crf=18)
        with pytest.raises(OutputError, match=f"no space left on {disk}"):
            writer.write(PromptSpec(0, "a ball"), 1, fake_generation((12, 96, 144)), ["t.txt"], {"seed": 1})
        assert files_under(disk) == []


def test_sample_files_respect_the_umask_and_never_replace_a_concurrent_writer(tmp_path, monkeypatch):
    from tora.sampling import OutputWriter, PromptSpec
    writer = OutputWriter(tmp_path, fps=8, crf=18)
    old = os.umask(0o027)
    try:
        first = writer.write(PromptSpec(0, "a ball"), 1, fake_generation(), ["t.txt"], {"seed": 1})
        # other samplers' files appeared between our name check and our rename: ours move on to -1, -2
        monkeypatch.setattr(OutputWriter, "taken", lambda self, name: False)
        second = writer.write(PromptSpec(0, "a ball"), 1, fake_generation(), ["t.txt"], {"seed": 2})
        third = writer.write(PromptSpec(0, "a ball"), 1, fake_generation(), ["t.txt"], {"seed": 3})
    finally:
        os.umask(old)
    assert [p.name for p in (first, second, third)] == [
        "0000_a_ball_seed1.mp4", "0000_a_ball_seed1-1.mp4", "0000_a_ball_seed1-2.mp4"]
    for path, seed in ((first, 1), (second, 2), (third, 3)):
        assert json.loads(path.with_suffix(".json").read_text()) == {"seed": seed}
    for path in files_under(tmp_path):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o640, path
    assert len(files_under(tmp_path)) == 15  # 3 x (video, record, overlay, points, prompt); no temporaries


def test_prompt_file_with_bom_is_read(tmp_path):
    file = tmp_path / "notepad.txt"
    file.write_bytes(b"\xef\xbb\xbfa red ball\r\na blue car\r\n")
    assert [spec.text for spec in read_prompt_file(file, image2video=False, img_dir=None)] == [
        "a red ball", "a blue car"]


def test_a_sample_is_reproduced_from_its_record_alone(tiny_ckpts, tmp_path):
    import yaml
    out = run(tiny_ckpts, tmp_path, "--input-file", str(prompts(tmp_path, "one", "a red ball")),
              "--point_path", str(REPO / "trajs/circle.txt"), "args.save_latents=true")
    record = json.loads((out / "video" / "0001_a_red_ball_seed1235.json").read_text())
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(record["config"]))
    single = prompts(tmp_path, record["prompt"], name="single.txt")
    sample_video.main(["--base", str(again), "--input-file", str(single), "--seed", str(record["seed"]),
                       "--output-dir", str(tmp_path / "again")])
    first = load_file(out / "latents" / "0001_a_red_ball_seed1235.safetensors")["latents"]
    second = load_file(tmp_path / "again" / "latents" / "0000_a_red_ball_seed1235.safetensors")["latents"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# -- case files: each prompt with its own trajectories (and image) ---------------------------

def cases_file(tmp_path, *cases):
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(case) + "\n" for case in cases))
    return path


def test_case_files_give_each_prompt_its_own_trajectories(tiny_ckpts, tmp_path):
    (tmp_path / "a.txt").write_text("10,10\n200,200\n")
    (tmp_path / "b.txt").write_text("200,20\n20,200\n")
    file = cases_file(tmp_path, {"prompt": "a red ball", "point_path": ["a.txt"]},
                      {"prompt": "two balls", "point_path": ["a.txt", "b.txt"]}, {"prompt": "no motion"})
    out = run(tiny_ckpts, tmp_path, "--input-file", str(file))
    first = json.loads((out / "traj" / "0000_a_red_ball_seed1234.json").read_text())
    second = json.loads((out / "traj" / "0001_two_balls_seed1235.json").read_text())
    assert np.array(first["points_xy"]).shape == (1, 9, 2) and np.array(second["points_xy"]).shape == (2, 9, 2)
    assert first["points_xy"][0] == second["points_xy"][0]  # same file, same points
    assert not (out / "traj" / "0002_no_motion_seed1236.json").exists()  # no trajectories: no motion
    assert (out / "video" / "0002_no_motion_seed1236.mp4").is_file()
    record = json.loads((out / "video" / "0001_two_balls_seed1235.json").read_text())
    assert [t["file"] for t in record["trajectories"]] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


def test_bad_case_files_are_explained(tiny_ckpts, tmp_path, caplog, no_models):
    (tmp_path / "a.txt").write_text("10,10\n200,200\n")
    (tmp_path / "bad.txt").write_text("10,10\n20;30\n")
    bad_lines = [
        ('{"prompt": "x", "point_path": ["a.txt"]}\nnot json\n', ":2: not a JSON object"),
        ('{"point_path": ["a.txt"]}\n', ':1: each line needs a "prompt" string'),
        ('{"prompt": "x", "points": ["a.txt"]}\n', ":1: unknown field(s) ['points'] (known: prompt, point_path, image)"),
        ('{"prompt": "x", "point_path": ["missing.txt"]}\n', ":1: trajectory file not found"),
        ('{"prompt": "x", "point_path": ["bad.txt"]}\n', "bad.txt, line 2"),
    ]
    for text, message in bad_lines:
        path = tmp_path / "cases.jsonl"
        path.write_text(text)
        expect_error(caplog, tiny_ckpts, tmp_path, message, "--input-file", str(path))
    path.write_text('{"prompt": "x", "point_path": ["a.txt"]}\n')
    expect_error(caplog, tiny_ckpts, tmp_path, ':1: image-to-video cases need an "image"', "--image2video",
                 "--input-file", str(path), variant="i2v")
