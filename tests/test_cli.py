"""The editing CLI and image input: every bad input gets a clear message, a non-zero exit, and
leaves nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_minimal.errors import FluxMinimalError
from flux_minimal.images import fit_width, load_image, save_png
from infer.edit import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def run(*args) -> int:
    return main([str(a) for a in args])


def test_cli_edit_writes_png_with_metadata(snapshot, png, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert run("--weights", snapshot, "--image", png, "--instruction", "make it red", "--out", out,
               "--steps", "2", "--width", "64", "--seed", "5", "--no-progress") == 0
    img = Image.open(out)
    assert img.size == (64, 48) and img.text["instruction"] == "make it red" and img.text["seed"] == "5"
    assert img.text["steps"] == "2" and img.text["guidance"] == "50.0" and "FLUX.1-Fill-dev" in img.text["files"]
    printed = capsys.readouterr().out
    assert "it/s" in printed and "text" in printed and "decode" in printed and "peak" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_cli_multi_turn_saves_every_turn(snapshot, png, tmp_path):
    out = tmp_path / "out.png"
    assert run("--weights", snapshot, "--image", png, "--instruction", "add a hat", "--instruction", "make it snow",
               "--out", out, "--steps", "1", "--width", "64", "--no-progress") == 0
    assert Image.open(tmp_path / "out_turn1.png").text["instruction"] == "add a hat"
    assert Image.open(tmp_path / "out_turn2.png").text["instruction"] == "make it snow"


def test_cli_error_is_one_line_and_exit_2(tmp_path, png):
    """As a user sees it: a subprocess, no traceback, exit status 2, nothing written."""
    out = tmp_path / "out.png"
    r = subprocess.run([sys.executable, "-m", "infer.edit", "--weights", str(tmp_path / "missing"), "--image",
                        str(png), "--instruction", "x", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "weights.md" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["corrupt", "missing_image", "tiny", "huge", "empty_instruction", "no_folder",
                                  "incomplete_weights", "judge_missing"])
def test_cli_bad_inputs(case, snapshot, png, tmp_path):
    image, weights, instruction, out, extra = png, snapshot, "make it red", tmp_path / "out.png", []
    if case == "corrupt":
        image = tmp_path / "bad.png"
        image.write_bytes(png.read_bytes()[:200])
        match = "not a readable image"
    elif case == "missing_image":
        image, match = tmp_path / "nope.png", "no such image file"
    elif case == "tiny":
        image = tmp_path / "tiny.png"
        Image.new("RGB", (40, 200)).save(image)
        match = "40x200; both sides must be at least 64"
    elif case == "huge":
        image = tmp_path / "huge.png"
        Image.new("1", (10000, 8000)).save(image)  # 80 MP, a few kB on disk
        match = r"10000x8000 \(80 MP\); the limit is 64 MP"
    elif case == "empty_instruction":
        instruction, match = "  ", "instruction is empty"
    elif case == "no_folder":
        out, match = tmp_path / "no" / "such" / "out.png", "the folder .* does not exist"
    elif case == "incomplete_weights":
        weights = tmp_path / "incomplete"
        weights.mkdir()
        (weights / "transformer").symlink_to(snapshot / "transformer")
        match = "weights.md"
    else:
        extra, match = ["--candidates", "3"], "needs a judge: pass --judge-url"
    with pytest.raises(FluxMinimalError, match=match):
        run("--weights", weights, "--image", image, "--instruction", instruction, "--out", out, "--steps", "1",
            "--width", "64", "--no-progress", *extra)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_cli_unwritable_folder(snapshot, png, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(FluxMinimalError, match="creating a file in .* fails"):
        run("--weights", snapshot, "--image", png, "--instruction", "x", "--out", ro / "o.png", "--steps", "1")


def _special_outputs(tmp_path: Path) -> dict[str, Path]:
    """Outputs that must be refused before any model loads, each with what the message says."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    cases = {"folder": tmp_path, "character device": Path("/dev/null"), "FIFO": fifo}
    if os.path.isdir("/proc/self"):  # as root os.access says yes here, yet no file can be created
        cases["/proc"] = Path("/proc/o.png")
    return cases


@pytest.mark.parametrize("kind", ["folder", "character device", "FIFO", "/proc"])
def test_cli_refuses_outputs_it_must_not_write(kind, png, tmp_path):
    """As a user runs it: one line, exit status 2, before the model loads (the weights folder does
    not even exist: loading would fail with another message), and the device or FIFO is unchanged."""
    cases = _special_outputs(tmp_path)
    if kind not in cases:
        pytest.skip("no /proc on this system (the monkeypatched test below covers a failing create)")
    out = cases[kind]
    before = os.stat(out) if out.exists() else None
    r = subprocess.run([sys.executable, "-m", "infer.edit", "--weights", str(tmp_path / "no_weights"), "--image",
                        str(png), "--instruction", "x", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "weights" not in r.stderr, r.stderr
    expect = {"folder": "is a folder: pass a file path inside it", "character device": "is a character device",
              "FIFO": "is a FIFO", "/proc": "creating a file in /proc fails"}[kind]
    assert expect in r.stderr
    if kind != "/proc":
        after = os.stat(out)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)


def test_check_output_when_creating_fails(tmp_path, monkeypatch):
    """Where /proc does not apply: a folder where creating a file fails although it exists."""
    import tempfile
    from flux_minimal.files import check_output

    def refuse(*a, **k):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(FluxMinimalError, match="creating a file in .* fails"):
        check_output(tmp_path / "o.png")


def test_finished_edit_is_never_lost(snapshot, png, tmp_path, monkeypatch, capsys):
    """The output was fine when checked, but the final write fails after the edit (the folder vanished):
    the PNG is in the temp folder and the one-line error says where."""
    import shutil
    import flux_minimal.images as images
    gone = tmp_path / "gone"
    gone.mkdir()
    real = images.save_or_fallback

    def vanish_first(path, *a, **k):
        shutil.rmtree(gone, ignore_errors=True)
        return real(path, *a, **k)
    monkeypatch.setattr(images, "save_or_fallback", vanish_first)
    with pytest.raises(FluxMinimalError, match="could not write the output PNG .*; the result is saved in (.*)") as e:
        run("--weights", snapshot, "--image", png, "--instruction", "make it red", "--out", gone / "o.png",
            "--steps", "1", "--width", "64", "--no-progress")
    rescued = Path(str(e.value).rsplit("saved in ", 1)[1])
    try:
        assert Image.open(rescued).text["instruction"] == "make it red"
    finally:
        rescued.unlink()


def test_width_not_multiple_of_16_is_said(snapshot, png, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert run("--weights", snapshot, "--image", png, "--instruction", "x", "--out", out, "--steps", "1",
               "--width", "70", "--no-progress") == 0
    assert "width 70 is not a multiple of 16 (FLUX's patch): using 64" in capsys.readouterr().out
    assert Image.open(out).width == 64


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "1"])
def test_image_modes_become_rgb(mode, tmp_path):
    if mode == "I;16":
        img = Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16))
        assert img.mode == "I;16"
    else:
        img = Image.new(mode, (64, 64))
    if mode in ("RGBA", "LA"):  # fully transparent: composited on white
        expect = (255, 255, 255)
    elif mode == "I;16":
        expect = (255, 255, 255)  # 16-bit white stays white (scaled to 8 bits, not clipped junk)
    elif mode == "CMYK":
        expect = (255, 255, 255)  # CMYK zeros = no ink = white
    else:
        expect = (0, 0, 0)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == expect


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 64, 64))  # left half blue
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    shown = load_image(path)
    assert shown.size == (64, 128) and shown.getpixel((32, 10))[2] > 200  # the blue half is now on top


def test_fit_width_rounding():
    assert fit_width(Image.new("RGB", (1000, 750)), 512).size == (512, 384)
    assert fit_width(Image.new("RGB", (1000, 1234)), 500).size == (496, 608)  # 496 x 612.1 -> x16


def test_save_png_atomic_on_failure(tmp_path, monkeypatch):
    """A crash while writing leaves neither a partial file nor the temporary."""
    target = tmp_path / "o.png"

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(RuntimeError):
        save_png(Image.new("RGB", (8, 8)), target)
    assert list(tmp_path.iterdir()) == []


def test_our_packages_win_over_packages_of_the_same_name(tmp_path):
    """Packages called like ours elsewhere on the path (PyPI has an `infer` and a `train`) do not
    shadow ours when run from the repository root (tests/test_names.py checks the other way)."""
    for name in ("flux_bench", "flux_eval", "flux_kernels", "flux_minimal", "infer", "mini_world", "train"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import flux_kernels.lora_moe, flux_minimal, infer.pipeline, train.train; "
                        "print(flux_kernels.__file__, flux_minimal.__file__, infer.__file__, train.__file__)"],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert all(Path(f).is_relative_to(REPO) for f in r.stdout.split())
    r = subprocess.run([sys.executable, "-m", "infer.edit", "--help"], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--instruction" in r.stdout


@pytest.mark.parametrize("command", [
    ["mini_world.recipe", "--out", "{fifo}"],
    ["train.train", "--weights", "nowhere", "--data", "nowhere", "--steps", "1", "--out", "{fifo}"],
    ["mini_world.ablation", "--weights", "nowhere", "--grid", "/dev/null"],
    ["mini_world.curve", "--work", "nowhere", "--png", "{tmp}"],
])
def test_every_writer_refuses_bad_outputs_first(command, tmp_path):
    """The recipe, fine-tuning, the ablation table and the learning curve check their outputs the
    same way as the editing CLI, before any work: one line, exit status 2, the FIFO left as it is."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = [a.format(fifo=fifo, tmp=tmp_path) for a in command]
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert any(s in r.stderr for s in ("is not a folder", "a character device", "is a folder")), r.stderr
    assert fifo.exists() and not fifo.is_file()
