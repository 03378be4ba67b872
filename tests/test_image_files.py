"""Images are read as transformers reads them and resized to the same bits: real photographs
(matplotlib's sample data) written with EXIF orientation tags and real transparency, opened from
paths, bytes, PIL objects and arrays, against transformers' PIL Gemma 3 image processor; and the
default backend's pixels on both of ATen's CPU code paths (AVX2 and the generic one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3_lab.prompt import images as img_ops

ROOT = Path(__file__).resolve().parents[1]
PAS = {"pan_and_scan_min_crop_size": img_ops.PAS_MIN_CROP, "pan_and_scan_max_num_crops": img_ops.PAS_MAX_CROPS,
       "pan_and_scan_min_ratio_to_activate": img_ops.PAS_MIN_RATIO}
# file name -> (EXIF orientation or None, read as a PIL object it is another picture: an EXIF
# turn, or an alpha band composited rather than dropped; a palette colour key whitens the same
# pixels both ways)
FILES = {
    "hopper-exif6.jpg": (6, True), "hopper-exif8.jpg": (8, True), "hopper-pair-exif6.jpg": (6, True),
    "hopper-alpha.png": (None, True), "logo2.png": (None, True), "minduka.png": (None, True),
    "hopper-palette-trns.png": (None, False),
}


def sample_path(name: str) -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data(name, asfileobj=False))


def sample(name: str) -> Image.Image:
    return Image.open(sample_path(name))


def write_photos(folder: Path) -> dict[str, Path]:
    """The FILES, made from matplotlib's sample photographs."""
    hopper = sample("grace_hopper.jpg").convert("RGB")  # 512×600
    out = {name: folder / name for name in FILES}
    for name, orientation in (("hopper-exif6.jpg", 6), ("hopper-exif8.jpg", 8)):
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation
        hopper.save(out[name], quality=95, exif=exif.tobytes())
    pair = Image.new("RGB", (1024, 600))  # upright it is 600×1024: tall enough for pan-and-scan crops
    pair.paste(hopper, (0, 0))
    pair.paste(hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    pair.save(out["hopper-pair-exif6.jpg"], quality=90, exif=exif.tobytes())
    yy, xx = np.mgrid[0:600, 0:512]
    alpha = np.clip(255 - np.hypot(xx - 256, yy - 300) * 0.9, 0, 255).astype(np.uint8)  # opaque centre, clear corners
    Image.fromarray(np.dstack([np.asarray(hopper), alpha])).save(out["hopper-alpha.png"])
    out["logo2.png"].write_bytes(sample_path("logo2.png").read_bytes())
    out["minduka.png"].write_bytes(sample_path("Minduka_Present_Blue_Pack.png").read_bytes())
    pal = hopper.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(out["hopper-palette-trns.png"], transparency=int(np.asarray(pal)[0, 0]))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    return write_photos(tmp_path_factory.mktemp("photos"))


def transformers_images():
    """What transformers' Gemma3ImageProcessor is without torchvision, configured as Gemma 3's."""
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, resample=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def hf_images():
    return transformers_images()


def ours(source, pan_and_scan: bool, backend: str = img_ops.DEFAULT_BACKEND) -> torch.Tensor:
    """pixel_values as `Processor` makes them: load_image, then preprocess."""
    pieces = img_ops.preprocess([img_ops.load_image(source)], pan_and_scan, backend=backend)[0]
    return torch.stack([p.pixels for p in pieces])


def theirs(hf_images, source, pan_and_scan: bool) -> torch.Tensor:
    return hf_images(images=[source], do_pan_and_scan=pan_and_scan, return_tensors="pt", **PAS)["pixel_values"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.oracle
@pytest.mark.parametrize("name", FILES)
def test_files_are_read_as_transformers_reads_them(photos, hf_images, name):
    path = photos[name]
    orientation, differs = FILES[name]
    for pas in (False, True):
        ref = theirs(hf_images, str(path), pas)
        for source in (path, str(path), path.read_bytes()):
            assert max_diff(ours(source, pas), ref) == 0, (name, pas, type(source).__name__)
    # a PIL object keeps its orientation and has alpha composited over white, as transformers does ...
    stored = Image.open(path)
    assert max_diff(ours(stored, False), theirs(hf_images, stored, False)) == 0
    # ... so most files really test something: read that way they are another picture
    assert (max_diff(ours(stored, False), theirs(hf_images, str(path), False)) > 0.5) == differs
    if orientation is not None:  # 6: turn a quarter clockwise to stand up, 8: anticlockwise
        turn = Image.Transpose.ROTATE_270 if orientation == 6 else Image.Transpose.ROTATE_90
        assert np.array_equal(np.asarray(img_ops.load_image(path)), np.asarray(stored.convert("RGB").transpose(turn)))


@pytest.mark.oracle
def test_pan_and_scan_crops_of_an_upright_photo(photos, hf_images):
    path = photos["hopper-pair-exif6.jpg"]
    got = ours(path, True)
    assert got.shape[0] == 3  # upright 600×1024: the whole image and two crops
    assert max_diff(got, theirs(hf_images, str(path), True)) == 0


@pytest.mark.oracle
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_arrays_match_transformers(hf_images, channels):
    rgba = np.asarray(sample("Minduka_Present_Blue_Pack.png").convert("RGBA"))
    arr = rgba[..., :1].copy() if channels == 1 else rgba[..., :channels].copy()
    assert max_diff(ours(arr, False), theirs(hf_images, arr, False)) == 0


@pytest.mark.oracle
def test_alpha_over_white_equals_transformers_for_every_value_and_alpha():
    from transformers.image_transforms import convert_to_rgb

    v = np.arange(256, dtype=np.uint8)
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., :3] = v[None, :, None]  # every colour value ...
    rgba[..., 3] = v[:, None]  # ... under every alpha
    want = convert_to_rgb(rgba, return_numpy=True)
    assert np.array_equal(np.asarray(img_ops.load_image(rgba)), want)
    assert np.array_equal(np.asarray(img_ops.load_image(Image.fromarray(rgba))), want)


# ----------------------------------------------------------------------------- CPU code paths
# Each run stands in for a machine: ATen's kernels for that CPU and numpy's SIMD limited to match.
CPUS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"},
}
CHILD = "import json, sys; sys.path.insert(0, sys.argv[1]); import test_image_files as t; print(json.dumps(t.cpu_report(sys.argv[2])))"


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def cpu_report(folder: str) -> dict:
    """Run in a child process: both backends on every photo (with pan-and-scan crops), and the
    default one against transformers' PIL processor there and then."""
    hf = transformers_images()
    report = {"capability": torch.backends.cpu.get_cpu_capability(), "files": {}}
    for name in FILES:
        path = Path(folder) / name
        pil, tch = ours(path, True), ours(path, True, backend="torch")
        report["files"][name] = {
            "pil_vs_transformers": max_diff(pil, theirs(hf, str(path), True)),
            "pil": _digest(pil), "torch": _digest(tch),
            "torch_vs_pil_levels": round(max_diff(tch, pil) * 127.5, 3),
        }
    return report


@pytest.fixture(scope="module")
def cpu_reports(photos) -> dict[str, dict]:
    folder = str(next(iter(photos.values())).parent)
    out = {}
    for cpu, env in CPUS.items():
        run = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tests"), folder], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        out[cpu] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.oracle
def test_default_backend_equals_transformers_on_both_cpu_paths(cpu_reports):
    assert {cpu: r["capability"] for cpu, r in cpu_reports.items()} == {"avx2": "AVX2", "default": "DEFAULT"}
    for cpu, report in cpu_reports.items():
        for name, r in report["files"].items():
            assert r["pil_vs_transformers"] == 0, (cpu, name)
    # and the pixels themselves do not depend on the CPU at all
    assert all(cpu_reports["avx2"]["files"][n]["pil"] == cpu_reports["default"]["files"][n]["pil"] for n in FILES)


@pytest.mark.oracle
def test_torch_backend_follows_torchvisions_cpu_rule(cpu_reports):
    """The "torch" option keeps torchvision's choice: the uint8 kernel where the capability names
    AVX2, float-and-round elsewhere. So its pixels change with the CPU (which also shows the two
    runs really took different code paths), staying within one level of PIL's."""
    a, b = cpu_reports["avx2"]["files"], cpu_reports["default"]["files"]
    assert any(a[n]["torch"] != b[n]["torch"] for n in FILES)
    assert all(r["torch_vs_pil_levels"] <= 1 for rep in (a, b) for r in rep.values())
