# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Preview PNGs of "Bringing your own masks" (the bundles' docs/README.md), from the synthetic phantom.

It runs the documented commands (``scripts.data_prep remap`` -> ``body_mask`` -> ``check_mask``) of a bundle on
the phantom of ``demo/mask_phantom.py`` (a CT, or an MR, with its segmentation in TotalSegmentator numbering)
and draws two axial slices after each step, plus the mask as generation resamples it with the findings of
``scripts.mask_checks`` before and after. Nothing is generated: image generation needs the published weights.

Usage (repository root)::

    python demo/mask_preview.py --bundle maisi_ct_generative
    python demo/mask_preview.py --bundle maisi_mr_generative
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from demo.mask_phantom import ORGANS, VERTEBRA, make_phantom  # noqa: E402

SHAPE, SPACING = (160, 160, 80), (2.5, 2.5, 3.0)
LEVELS_MM = (40.0, -45.0)  # axial slices through the lungs and through liver, spleen and kidneys
ZOOM = 2
# TotalSegmentator v2 MR ids of the phantom's organs (task total_mr): the lungs and the vertebral column are whole
TOTALSEG_MR_IDS = {"right lung lower lobe": 11, "left lung lower lobe": 10, "liver": 5, "spleen": 1, "right kidney": 2, "left kidney": 3}
TOTALSEG_MR_VERTEBRAE = 19
BODY_COLOUR = (235, 200, 60)
# the generation geometry of the docs' example commands: a field of view that holds the phantom's trunk
GEOMETRY = {
    "maisi_ct_generative": {"spacing": [1.5, 1.5, 2.0], "output_size": [256, 256, 128]},
    "maisi_mr_generative": {"spacing": [1.4, 1.4, 1.8], "output_size": [256, 256, 128]},
}


def _colour(label: int) -> tuple[int, int, int]:
    if label == 200:
        return BODY_COLOUR
    rng = np.random.default_rng(label * 7919)
    return tuple(int(v) for v in rng.integers(60, 255, size=3))  # type: ignore[return-value]


def _axial(volume: np.ndarray, affine: np.ndarray, z_mm: float) -> np.ndarray:
    index = int(round((z_mm - affine[2, 3]) / affine[2, 2]))
    plane = volume[:, :, int(np.clip(index, 0, volume.shape[2] - 1))]
    return plane.T[::-1, ::-1]  # anterior up, patient's right on the image's left (radiological)


def _panel(image: np.ndarray, labels: np.ndarray | None, window: tuple[float, float], title: str) -> Image.Image:
    grey = np.clip((image - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    rgb = np.repeat((grey * 255.0)[..., None], 3, axis=2)
    if labels is not None:
        for label in np.unique(labels):
            if label == 0:
                continue
            alpha = 0.35 if label == 200 else 0.55
            rgb[labels == label] = (1.0 - alpha) * rgb[labels == label] + alpha * np.asarray(_colour(int(label)), dtype=np.float64)
    picture = Image.fromarray(rgb.astype(np.uint8)).resize((image.shape[1] * ZOOM, image.shape[0] * ZOOM), Image.NEAREST)
    canvas = Image.new("RGB", (picture.width, picture.height + 16), (255, 255, 255))
    canvas.paste(picture, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), title, fill=(0, 0, 0))
    return canvas


def _row(panels: Sequence[Image.Image], caption: Sequence[str] = ()) -> Image.Image:
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    height = max(p.height for p in panels) + 14 * len(caption) + (4 if caption else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 8
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(caption):
        draw.text((4, max(p.height for p in panels) + 4 + 14 * index), line, fill=(0, 0, 0))
    return canvas


def _step(image: np.ndarray, labels: np.ndarray | None, affine: np.ndarray, window: tuple[float, float], title: str, caption: Sequence[str] = ()) -> Image.Image:
    panels = [_panel(_axial(image, affine, z), None if labels is None else _axial(labels, affine, z), window, f"{title}, z = {z:g} mm") for z in LEVELS_MM]
    return _row(panels, caption)


def _findings_lines(findings: Sequence[dict], heading: str) -> list[str]:
    lines = [heading]
    lines += [f"  {f['severity']}: {f['code']}" for f in findings] or ["  no finding"]
    return lines


def _totalseg_mr(phantom) -> np.ndarray:
    ids = np.zeros_like(phantom.totalseg_labels)
    for name, (maisi_id, *_rest) in ORGANS.items():
        ids[phantom.maisi_labels == maisi_id] = TOTALSEG_MR_IDS[name]
    ids[phantom.maisi_labels == VERTEBRA[1]] = TOTALSEG_MR_VERTEBRAE
    return ids


def make_previews(bundle: str, output_dir: Path) -> list[Path]:
    """Run the three commands of the docs on the phantom in ``bundle`` and write the preview PNGs."""
    is_mr = bundle == "maisi_mr_generative"
    phantom = make_phantom(SHAPE, SPACING)
    image = phantom.mr if is_mr else phantom.ct
    source_labels = _totalseg_mr(phantom) if is_mr else phantom.totalseg_labels
    mapping = "totalsegmentator_v2_mr" if is_mr else "totalsegmentator_v2"
    window = (0.0, 700.0) if is_mr else (-400.0, 400.0)
    kind = "MR" if is_mr else "CT"
    written = []
    sys.path.insert(0, str(REPO_ROOT / "bundles" / bundle))  # one bundle per process: its scripts package
    with tempfile.TemporaryDirectory() as tmp:
        data_prep = importlib.import_module("scripts.data_prep")
        label_io = importlib.import_module("scripts.label_io")
        root = Path(tmp)
        for folder, data in (("images", image), ("totalseg", source_labels)):
            (root / folder).mkdir()
            nib.save(nib.Nifti1Image(data, phantom.affine), str(root / folder / "case.nii.gz"))
        geometry = GEOMETRY[bundle]
        before = data_prep.check_mask(str(root / "totalseg/case.nii.gz"), report=str(root / "before.json"), **geometry)
        remapped = data_prep.remap(str(root / "totalseg"), str(root / "maisi"), mapping)
        data_prep.body_mask(str(root / "images"), str(root / "body"), label_dir=str(root / "maisi"))
        after = data_prep.check_mask(str(root / "body/case.nii.gz"), report=str(root / "after.json"), **geometry)
        maisi = np.asarray(nib.load(str(root / "maisi/case.nii.gz")).dataobj)
        final = np.asarray(nib.load(str(root / "body/case.nii.gz")).dataobj)
        unmapped = [f"  source id {k} ({v['source_name']}): {v['voxels']} voxels -> {remapped['unmapped_value']}" for k, v in remapped["unmapped_total"].items()]
        steps = {
            "mask_step0_input": _step(image, source_labels, phantom.affine, window, f"{kind} + TotalSegmentator ids", ["the segmentation as the tool writes it: no body label, another numbering"]),
            "mask_step1_remap": _step(image, maisi, phantom.affine, window, f"remap --mapping {mapping}", ["MAISI ids (same regions, new numbers)", *(["no MAISI counterpart, reported:", *unmapped] if unmapped else [])]),
            "mask_step2_body_mask": _step(
                image, final, phantom.affine, window, "body_mask --label_dir", [f"yellow: body label 200 where the envelope has no organ; organs untouched{'' if is_mr else '; table left out'}"]
            ),
        }
        loaded = label_io.load_label_file(root / "body/case.nii.gz")
        spacing, output_size = geometry["spacing"], geometry["output_size"]
        resampled = label_io.resample_mask(loaded, spacing, output_size)
        array, affine = np.asarray(resampled[0]), np.asarray(resampled.affine, dtype=np.float64)
        z_centre = affine[2, 3] + affine[2, 2] * (array.shape[2] - 1) / 2.0
        panels = [
            _panel(np.zeros(array.shape[:2][::-1], np.float32), _axial(array, affine, z_centre), (0.0, 1.0), f"as generation sees it: {output_size} at {spacing} mm"),
        ]
        caption = _findings_lines(before, "check_mask before remap/body_mask:") + _findings_lines(after, "check_mask after:")
        steps["mask_step3_check"] = _row(panels, caption)
        output_dir.mkdir(parents=True, exist_ok=True)
        for name, picture in steps.items():
            path = output_dir / f"{name}.png"
            picture.save(path, optimize=True)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", choices=("maisi_ct_generative", "maisi_mr_generative"), default="maisi_ct_generative")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: bundles/<bundle>/docs/images")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or REPO_ROOT / "bundles" / args.bundle / "docs" / "images"
    written = make_previews(args.bundle, output_dir)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
