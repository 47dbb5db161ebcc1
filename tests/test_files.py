"""Reading user text files and writing outputs (tora.files, tora.video_io): encodings, the umask, a
failed encoder, a full disk, unwritable folders - nothing half-written, every failure named."""
import contextlib
import os
import stat
import subprocess
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from tora import video_io
from tora.files import (InputFileError, OutputError, StagedFiles, atomic_write_text, check_output_folder,
                        read_user_text)

FRAMES = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64k", options: str = ""):
    """A tiny tmpfs at ``path`` (root only); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield path
    finally:  # lazy: a file the failed code under test still holds open must not keep the mount
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bom_is_stripped_and_non_utf8_names_file_and_line(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa red ball\n")
    assert read_user_text(bom, "prompt file") == "a red ball\n"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputFileError, match=rf"prompt file {latin}, line 2: not UTF-8 text \(byte 0xe9\)"):
        read_user_text(latin, "prompt file")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        video_io.write_mp4(tmp_path / "v.mp4", FRAMES, fps=8)
        atomic_write_text(tmp_path / "latest", "7")
    finally:
        os.umask(old)
    for name in ("v.mp4", "latest"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert imageio.mimread(tmp_path / "v.mp4")[0].shape == (32, 48, 3)


def test_a_failing_encoder_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io.imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")  # exits 1, writes nothing
    with pytest.raises(OutputError, match=r"ffmpeg failed \(exit 1\) writing"):
        video_io.write_mp4(tmp_path / "v.mp4", FRAMES, fps=8)
    assert visible(tmp_path) == []


def test_a_full_disk_says_so_and_leaves_no_file(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="16k") as disk:
        with pytest.raises(OutputError, match=f"no space left on {disk}"):
            video_io.write_mp4(disk / "v.mp4", np.tile(FRAMES, (4, 2, 2, 1)), fps=8)  # noise: ~200 kB
        assert visible(disk) == []
        with pytest.raises(OutputError, match=f"no space left on {disk}"):
            atomic_write_text(disk / "big.txt", "x" * 100_000)
        assert visible(disk) == []


def test_staged_files_appear_together_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with StagedFiles() as staged:
            staged.path(tmp_path / "a.txt").write_text("a")
            raise RuntimeError("the second output failed")
    assert visible(tmp_path) == []
    with StagedFiles() as staged:
        staged.path(tmp_path / "a.txt").write_text("a")
        staged.path(tmp_path / "b.txt").write_text("b")
    assert visible(tmp_path) == ["a.txt", "b.txt"]


def test_unwritable_output_folders_are_named(tmp_path):
    a_file = tmp_path / "out.txt"
    a_file.write_text("")
    with pytest.raises(OutputError, match=f"output folder {a_file} is a file, not a folder"):
        check_output_folder(a_file)
    out = tmp_path / "out"
    (out / "video").parent.mkdir()
    (out / "video").write_text("")
    with pytest.raises(OutputError, match=f"output folder {out / 'video'} is a file"):
        check_output_folder(out, ("prompt", "video"))
    assert visible(out) == ["video"]  # prompt/ was created by the check and removed again


def test_read_only_output_folder_is_named(tmp_path):
    with small_tmpfs(tmp_path / "ro", options=",ro") as ro:
        with pytest.raises(OutputError, match=f"cannot write to output folder {ro / 'run'}: Read-only file system"):
            check_output_folder(ro / "run", ("video",))
