"""The editor's work without a browser (tora.editor_app.Session): settings, imports, bad input as page
messages, and generation whose downloads reproduce the same video through sample_video.py."""
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from tora import tracks as T
from tora.config import ConfigError
from tora.editor_app import Session, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def session(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    settings = load_settings()
    settings.server.output_dir = str(tmp_path / "runs")
    bases = [str(REPO / "configs/tora/model/tora_tiny.yaml"), str(REPO / "configs/tora/inference.yaml")]
    return Session(settings, bases, str(tiny_ckpts / "t2v"), tiny_overrides(tiny_ckpts), device="cpu")


def tiny_overrides(tiny_ckpts) -> list[str]:
    """The VAE and T5 of this module's tiny checkpoints (not the repository's ckpts/tiny)."""
    return [f"model.first_stage_config.params.ckpt_path={tiny_ckpts / 'vae/3d-vae.pt'}",
            f"model.conditioner_config.params.emb_models=[{{params: {{model_dir: {tiny_ckpts / 't5'}, max_length: 16}}}}]"]


def editor_state(session, *tracks):
    return json.dumps({"editor_size": list(session.editor_size),
                       "tracks": [{"points": points, "static": static} for points, static in tracks]})


def test_settings_are_validated(tmp_path):
    bad = tmp_path / "app.yaml"
    bad.write_text("editor:\n  width: 500\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'editor.width' \(in .*app.yaml\)"):
        load_settings(bad)
    settings = load_settings()
    assert settings.server.host == "127.0.0.1" and settings.model.load == "ckpts/tiny/t2v"


def test_page_facts(session):
    assert session.frame_choices() == [9, 17, 25]  # odd latent counts of the tiny model (7 latent frames)
    assert session.editor_size == (576, 384)  # the 144x96 video's 3:2
    assert "random, untrained weights" in session.model_description()
    assert session.recipes() == ["none", "24gb", "8gb"] and "circle.txt" in session.presets()


def test_bad_input_is_a_message(session, tmp_path):
    text = tmp_path / "photo.png"
    text.write_text("not a png")
    assert session.set_image(str(text)).message == "**Error:** the upload photo.png is not an image (UnidentifiedImageError)"
    one_point = editor_state(session, ([[10, 10]], False))
    assert "track 1 has only 1 point" in session.preview(one_point, "as_drawn", 9, None).message
    assert "no tracks" in session.generate(editor_state(session), "as_drawn", 9, "a", 1, 2, 6, "none", None).message
    assert "this model makes [9, 17, 25]" in session.export(editor_state(session, ([[1, 1], [9, 9]], False)),
                                                            "uniform", 10).message
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 100)
    assert session.transfer(str(clip), "", 2).message.startswith("**Error:** ")
    assert session.clip_first_frame(str(clip))[1].startswith("**Error:** cannot decode the video clip.mp4")
    (tmp_path / "x.csv").write_text("1,2")
    assert "expected .txt, .json or .npy" in session.import_files([str(tmp_path / "x.csv")]).message


def test_presets_and_imports_reach_the_editor(session, tmp_path):
    reply = session.load_preset("circle.txt")
    (track,) = json.loads(reply.payload)["tracks"]
    circle = T.read_point_files([REPO / "trajs/circle.txt"])[0].points
    assert T.editor_to_canvas(track["points"], session.editor_size) == circle  # cell centres map back
    export = session.export(editor_state(session, ([[10, 10], [300, 200]], False), ([[50, 60]], True)), "uniform", 17)
    files = [Path(f) for f in export.files]
    assert [f.name for f in files] == ["track_1.txt", "track_2.txt", "tracks.json", "tracks.npy", "visibility.npy"]
    for chosen in (files[:2], files[2:3], files[3:5]):  # point files, the JSON, the arrays
        imported = json.loads(session.import_files([str(f) for f in chosen]).payload)["tracks"]
        assert len(imported) == 2 and imported[1]["static"]
    assert np.load(files[3]).shape == (17, 2, 2)


def test_generation_downloads_reproduce_the_video(session, tmp_path, monkeypatch):
    """The point files and sample_video.sh of a generation make the same video with sample_video.py."""
    steps = []
    state = editor_state(session, ([[20, 30], [200, 250], [500, 100]], False), ([[400, 300]], True))
    reply = session.generate(state, "ease", 9, "a red disc", 7, 2, 6.0, "none", None,
                             progress=lambda step, total: steps.append((step, total)))
    assert reply.message.startswith("Generated 9 frames with 2 track(s), seed 7, 2 steps"), reply.message
    assert steps == [(1, 2), (2, 2)]
    folder = Path(reply.videos[0]).parent
    command = shlex.split((folder / "sample_video.sh").read_text())
    assert command[:2] == ["python", "sat/sample_video.py"]
    import sample_video

    sample_video.main(command[2:])
    (again,) = (folder / "sample_video/video").glob("*.mp4")
    assert again.read_bytes() == (folder / "video.mp4").read_bytes()
    document = json.loads((folder / "tracks.json").read_text())
    assert document["tracks"][1]["frame_points"] == [document["tracks"][1]["drawn_points"][0]] * 9


def test_image_to_video_first_frame_and_round_trip(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    settings = load_settings()
    settings.server.output_dir = str(tmp_path / "runs")
    bases = [str(REPO / f"configs/tora/model/{name}.yaml") for name in ("tora_tiny", "tora_tiny_i2v")]
    session = Session(settings, bases, str(tiny_ckpts / "i2v"), tiny_overrides(tiny_ckpts), device="cpu")
    assert session.image2video and "image-to-video" in session.model_description()
    state = editor_state(session, ([[20, 30], [200, 250]], False))
    assert "upload a first frame" in session.generate(state, "uniform", 9, "a", 1, 2, 6, "none", None).message
    image = REPO / "assets/images" / sorted(p.name for p in (REPO / "assets/images").iterdir())[0]
    payload = json.loads(session.set_image(str(image)).payload)
    assert payload["background"].startswith("data:image/png;base64,") and not payload["replace"]
    preview = session.preview(state, "uniform", 9, str(image))
    assert preview.message.startswith("Preview:") and Path(preview.videos[0]).stat().st_size > 0
    reply = session.generate(state, "uniform", 9, "a ball", 3, 2, 6.0, "none", str(image))
    assert reply.message.startswith("Generated 9 frames"), reply.message
    folder = Path(reply.videos[0]).parent
    assert (folder / "prompt.txt").read_text() == "a ball@@first_frame.png\n"
    import sample_video

    sample_video.main(shlex.split((folder / "sample_video.sh").read_text())[2:])
    (again,) = (folder / "sample_video/video").glob("*.mp4")
    assert again.read_bytes() == (folder / "video.mp4").read_bytes()
