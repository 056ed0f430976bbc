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
Prepare your own NIfTI images for MAISI training (``python -m scripts.data_prep <command> ...`` from the bundle).

Commands (``--help`` on each):

- ``check IMAGE_DIR [--report report.json]``: read every image header (and intensities) and report shapes,
  spacings, orientations, channel counts and intensity ranges, whether they are consistent, and a
  suggested common spacing and shape. Diffusion training needs consistent inputs: mixed spacings and
  fields of view are the most common reason the loss stays high.
- ``resample IMAGE_DIR OUTPUT_DIR --spacing [sx,sy,sz] [--shape [X,Y,Z]] [--label_dir DIR]``: reorient to
  RAS, resample to ``spacing`` (images linear, labels nearest), then centre-crop/pad to ``shape`` (images
  padded with air, -1000 HU for CT / 0 for MR; labels with 0).
- ``datalist IMAGE_DIR OUTPUT_JSON [--label_dir DIR] [--num_folds 5] [--modality ct] [--top_region chest
  --bottom_region abdomen | --regions_from_labels True]``: the training datalist with folds and the
  per-image metadata the embeddings' sidecars need (modality code, body-region one-hots for ddpm-ct).
- ``sidecars EMBEDDING_DIR [--modality ct] [--top_region ... --bottom_region ...]``: write missing
  ``<case>_emb.nii.gz.json`` sidecars for latents made by other tools (dim and spacing from the latent).

CT intensities stay in Hounsfield units on disk: ``resample`` only interpolates them. The mapping to the
autoencoder's [0, 1] input (-1000..1000 HU, clipped; MR: 0..99.5th percentile) happens when the images are
encoded (``scripts.intensity``). ``check`` warns when a CT image does not look like HU (no air below
-500 HU, or values above 4000).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .constants import BODY_REGIONS
from .embeddings import LATENT_DOWNSAMPLE, LATENT_SUFFIX, make_sidecar, modality_code, sidecar_path
from .checkpoint import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["check", "datalist", "find_images", "region_one_hot", "resample", "sidecars"]

IMAGE_EXTENSIONS = (".nii.gz", ".nii")
CT_PAD_HU = -1000.0
_CT_AIR_HU = -500.0
_CT_MAX_PLAUSIBLE_HU = 4000.0


def find_images(image_dir: str | os.PathLike) -> list[Path]:
    """
    The NIfTI files (``.nii.gz``/``.nii``) directly in ``image_dir``, sorted by name.

    Raises
    ------
    ValueError
        the folder does not exist or holds no NIfTI file.
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise ValueError(f"image_dir='{folder}' is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"image_dir='{folder}' holds no NIfTI images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _load(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(str(path))
        _ = image.shape
    except Exception as error:  # nibabel raises many types for corrupt or foreign files
        raise ValueError(f"image '{path}' cannot be read as NIfTI: {error}") from error
    if len(image.shape) not in (3, 4):
        raise ValueError(f"image '{path}' has shape {image.shape}; expected a 3D volume (or 4D with channels last).")
    return image


def _spacing(image: nib.Nifti1Image) -> list[float]:
    return [round(float(v), 4) for v in np.linalg.norm(image.affine[:3, :3], axis=0)]


def _describe(path: Path, modality_family: str, intensity: bool) -> dict[str, Any]:
    image = _load(path)
    info: dict[str, Any] = {
        "file": str(path),
        "shape": [int(s) for s in image.shape[:3]],
        "channels": int(image.shape[3]) if len(image.shape) == 4 else 1,
        "spacing": _spacing(image),
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "dtype": str(image.get_data_dtype()),
        "warnings": [],
    }
    if intensity:
        try:
            data = np.asarray(image.dataobj, dtype=np.float32)
        except Exception as error:
            raise ValueError(f"image '{path}' cannot be read: {error}") from error
        if not np.all(np.isfinite(data)):
            info["warnings"].append("holds NaN or infinite values")
            data = data[np.isfinite(data)]
        low, p005, p995, high = (float(v) for v in np.percentile(data, [0, 0.5, 99.5, 100]))
        info["intensity"] = {"min": low, "p0.5": p005, "p99.5": p995, "max": high}
        if modality_family == "ct" and (low > _CT_AIR_HU or high > _CT_MAX_PLAUSIBLE_HU):
            info["warnings"].append(
                f"intensities {low:.0f}..{high:.0f} do not look like Hounsfield units (expected air near -1000); "
                "the CT mapping clips -1000..1000 HU to [0, 1]"
            )
    return info


def _default_modality_mapping() -> Path:
    from .labels import default_data_path

    return default_data_path("modality_mapping.json")


def _family(modality: Any) -> str:
    from .intensity import modality_family

    return modality_family(modality)


def check(image_dir: str, report: str | None = None, modality: str = "ct", intensity: bool = True) -> dict[str, Any]:
    """
    Check a folder of NIfTI images for consistency and write a JSON report.

    Parameters
    ----------
    image_dir
        folder of ``.nii.gz``/``.nii`` images.
    report
        where the JSON report goes (default ``<image_dir>/data_check_report.json``).
    modality
        ``ct`` or an MR name: decides the intensity plausibility check.
    intensity
        also read the voxels for intensity ranges (slower); ``False`` reads headers only.

    Returns
    -------
    dict
        the report: ``images`` (one entry per file), ``summary`` (distinct shapes, spacings, orientations,
        channel counts), ``consistent``, ``suggested_spacing`` (median), ``suggested_shape`` (median, rounded
        up to a multiple of 32) and ``warnings``.

    Raises
    ------
    ValueError
        no images, an unreadable file, or images with different channel counts (naming the files).
    """
    family = _family(modality)
    files = find_images(image_dir)
    images = [_describe(path, family, bool(intensity)) for path in files]
    by_channels: dict[int, list[str]] = {}
    for info in images:
        by_channels.setdefault(info["channels"], []).append(info["file"])
    if len(by_channels) > 1:
        listing = "; ".join(f"{count} channel(s): '{names[0]}'" + (f" and {len(names) - 1} more" if len(names) > 1 else "") for count, names in by_channels.items())
        raise ValueError(f"images in '{image_dir}' have different channel counts ({listing}); use one channel per file.")
    summary = {
        key: sorted({json.dumps(info[key]) for info in images}) for key in ("shape", "spacing", "orientation", "channels")
    }
    summary = {key: [json.loads(v) for v in values] for key, values in summary.items()}
    spacing = np.median(np.array([info["spacing"] for info in images]), axis=0)
    shape = np.median(np.array([info["shape"] for info in images]), axis=0)
    warnings = [f"{info['file']}: {w}" for info in images for w in info["warnings"]]
    consistent = all(len(summary[key]) == 1 for key in ("shape", "spacing", "orientation"))
    if not consistent:
        warnings.append(
            "the images differ in shape, spacing or orientation: resample them to one spacing and shape "
            "(python -m scripts.data_prep resample ...) before creating embeddings"
        )
    result = {
        "image_dir": str(Path(image_dir)),
        "num_images": len(images),
        "consistent": consistent,
        "summary": summary,
        "suggested_spacing": [round(float(v), 3) for v in spacing],
        "suggested_shape": [int(np.ceil(v / 32.0) * 32) for v in shape],
        "warnings": warnings,
        "images": images,
    }
    report_path = Path(report) if report is not None else Path(image_dir) / "data_check_report.json"
    _write_json(report_path, result)
    logger.info("%d images, consistent=%s, report: %s", len(images), consistent, report_path)
    for warning in warnings:
        logger.warning(warning)
    return result


def _write_json(path: Path, content: Any) -> Path:
    def write(tmp_name: str) -> None:
        with open(tmp_name, "w") as handle:
            json.dump(content, handle, indent=4)

    return atomic_write(path, write, suffix=".json")


def _three(name: str, value: Any, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values):
        raise ValueError(f"{name}={value!r} is not allowed; give three positive numbers, e.g. [1.5,1.5,2.0].")
    if kind is int and any(int(v) != v for v in values):
        raise ValueError(f"{name}={value!r} is not allowed; give three positive integers, e.g. [256,256,128].")
    return [kind(v) for v in values]


def _resample_one(source: Path, target: Path, spacing: list[float], shape: list[int] | None, is_label: bool, pad_value: float) -> None:
    from monai.transforms import Compose, LoadImage, Orientation, ResizeWithPadOrCrop, Spacing

    transforms = [
        LoadImage(image_only=True, ensure_channel_first=True),
        Orientation(axcodes="RAS", labels=None),
        Spacing(pixdim=spacing, mode="nearest" if is_label else "bilinear", padding_mode="border"),
    ]
    if shape is not None:
        transforms.append(ResizeWithPadOrCrop(spatial_size=shape, mode="constant", value=pad_value))
    try:
        volume = Compose(transforms)(str(source))
    except Exception as error:
        raise ValueError(f"image '{source}' cannot be resampled: {error}") from error
    if volume.shape[0] != 1:
        raise ValueError(f"image '{source}' has {volume.shape[0]} channels; use one channel per file.")
    array = np.asarray(volume[0])
    affine = np.asarray(volume.affine, dtype=np.float64)
    source_dtype = nib.load(str(source)).get_data_dtype()
    if is_label or np.issubdtype(source_dtype, np.integer):
        info = np.iinfo(source_dtype) if np.issubdtype(source_dtype, np.integer) else np.iinfo(np.int16)
        array = np.clip(np.round(array), info.min, info.max).astype(source_dtype if np.issubdtype(source_dtype, np.integer) else np.int16)
    else:
        array = array.astype(np.float32)

    def write(tmp_name: str) -> None:
        image = nib.Nifti1Image(array, affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp_name)

    atomic_write(target, write, suffix=".nii.gz" if target.name.endswith(".nii.gz") else ".nii")


def resample(
    image_dir: str,
    output_dir: str,
    spacing: Sequence[float],
    shape: Sequence[int] | None = None,
    label_dir: str | None = None,
    modality: str = "ct",
) -> list[str]:
    """
    Reorient to RAS, resample to ``spacing`` and crop/pad to ``shape`` every image (and its label).

    Parameters
    ----------
    image_dir
        folder of the input images.
    output_dir
        images go to ``<output_dir>/images``, labels to ``<output_dir>/labels`` (same file names).
    spacing
        target voxel size in mm, e.g. ``[1.5,1.5,2.0]``.
    shape
        target shape after resampling (centre crop / pad); ``None`` keeps the resampled field of view.
    label_dir
        optional folder of label masks with the same file names as the images (resampled with nearest
        neighbour, padded with 0, ids unchanged).
    modality
        ``ct`` pads images with -1000 HU (air); MR names pad with 0.

    Returns
    -------
    list[str]
        the written image paths.

    Raises
    ------
    ValueError
        bad ``spacing``/``shape``, no images, an unreadable file, a missing label, or a label whose grid
        differs from its image (naming the files).
    """
    spacing_mm = _three("spacing", spacing, float)
    target_shape = None if shape is None else _three("shape", shape, int)
    pad_value = CT_PAD_HU if _family(modality) == "ct" else 0.0
    files = find_images(image_dir)
    labels = {}
    if label_dir is not None:
        for path in files:
            label = Path(label_dir) / path.name
            if not label.is_file():
                raise ValueError(f"label_dir='{label_dir}' has no label '{label.name}' for image '{path}'.")
            image, mask = _load(path), _load(label)
            if image.shape[:3] != mask.shape[:3] or not np.allclose(image.affine, mask.affine, atol=1e-3):
                raise ValueError(
                    f"label '{label}' (shape {mask.shape[:3]}) does not share the grid of image '{path}' "
                    f"(shape {image.shape[:3]}); labels must have the image's shape and affine."
                )
            labels[path] = label
    written = []
    out = Path(output_dir)
    for path in files:
        _describe(path, "mr", intensity=False)
        target = out / "images" / path.name
        _resample_one(path, target, spacing_mm, target_shape, is_label=False, pad_value=pad_value)
        if path in labels:
            _resample_one(labels[path], out / "labels" / path.name, spacing_mm, target_shape, is_label=True, pad_value=0.0)
        written.append(str(target))
        logger.info("resampled %s", path.name)
    return written


def region_one_hot(region: str | None) -> list[int] | None:
    """``"chest"`` -> ``[0, 1, 0, 0]`` (names and aliases of ``validation.check_body_region``); ``None`` -> ``None``."""
    if region is None:
        return None
    from .labels import check_body_region

    indices = check_body_region(str(region))
    one_hot = [0] * len(BODY_REGIONS)
    one_hot[indices[0]] = 1
    return one_hot


def _regions_from_label(label: Path) -> tuple[list[int], list[int]]:
    from .labels import body_region_indices_from_mask

    mask = np.asarray(_load(label).dataobj)
    try:
        top, bottom = body_region_indices_from_mask(mask)
    except ValueError as error:
        raise ValueError(f"label '{label}': {error} Give --top_region/--bottom_region instead.") from error
    return [int(v) for v in top], [int(v) for v in bottom]


def datalist(
    image_dir: str,
    output: str,
    label_dir: str | None = None,
    num_folds: int = 5,
    modality: str = "ct",
    top_region: str | None = None,
    bottom_region: str | None = None,
    regions_from_labels: bool = False,
    seed: int = 0,
    modality_mapping_json: str | None = None,
) -> dict[str, Any]:
    """
    Write the training datalist ``{"training": [{"image", "label"?, "fold", "modality", regions?}, ...]}``.

    Parameters
    ----------
    image_dir
        folder of the (prepared) images.
    output
        the datalist file; paths inside are relative to its folder.
    label_dir
        optional label masks with the images' file names (ControlNet training needs them).
    num_folds
        images are shuffled with ``seed`` and dealt to folds ``0..num_folds-1``.
    modality
        modality name or code of ``modality_mapping.json`` (e.g. ``ct``, ``mri_t1``), stored as its code.
    top_region, bottom_region
        body regions covered by every image (ddpm-ct): head, chest, abdomen, pelvis (and aliases).
    regions_from_labels
        derive each image's regions from its label mask instead (needs ``label_dir``).
    seed
        fold assignment seed.
    modality_mapping_json
        the modality table (default: the bundle's ``configs/modality_mapping.json``).

    Returns
    -------
    dict
        the datalist written.

    Raises
    ------
    ValueError
        no images, unreadable files, a missing label, mixed channel counts, bad ``num_folds``, an unknown
        modality or region (each naming the value).
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 1:
        raise ValueError(f"num_folds={num_folds!r} is not allowed; it must be an integer >= 1.")
    if (top_region is None) != (bottom_region is None):
        raise ValueError("give both --top_region and --bottom_region, or neither.")
    if regions_from_labels and (label_dir is None or top_region is not None):
        raise ValueError("regions_from_labels=True needs label_dir and excludes --top_region/--bottom_region.")
    code = modality_code(modality, modality_mapping_json or _default_modality_mapping())
    top, bottom = region_one_hot(top_region), region_one_hot(bottom_region)
    files = find_images(image_dir)
    channels = {path: _describe(path, "mr", intensity=False)["channels"] for path in files}
    if len(set(channels.values())) > 1:
        listing = "; ".join(f"'{p}': {c}" for p, c in channels.items())
        raise ValueError(f"images in '{image_dir}' have different channel counts ({listing}); use one channel per file.")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    folds = {index: rank % num_folds for rank, index in enumerate(order)}
    base = Path(output).resolve().parent
    items = []
    for index, path in enumerate(files):
        item: dict[str, Any] = {"image": os.path.relpath(path.resolve(), base), "fold": folds[index], "modality": code}
        if label_dir is not None:
            label = Path(label_dir) / path.name
            if not label.is_file():
                raise ValueError(f"label_dir='{label_dir}' has no label '{label.name}' for image '{path}'.")
            _load(label)
            item["label"] = os.path.relpath(label.resolve(), base)
            if regions_from_labels:
                item["top_region_index"], item["bottom_region_index"] = _regions_from_label(label)
        if top is not None:
            item["top_region_index"], item["bottom_region_index"] = top, bottom
        items.append(item)
    content = {"training": items}
    _write_json(Path(output), content)
    logger.info("datalist of %d images in %d folds: %s", len(items), num_folds, output)
    return content


def sidecars(
    embedding_dir: str,
    modality: str = "ct",
    top_region: str | None = None,
    bottom_region: str | None = None,
    overwrite: bool = False,
    modality_mapping_json: str | None = None,
) -> list[str]:
    """
    Write the sidecar of every ``*_emb.nii.gz`` latent in ``embedding_dir`` that lacks one.

    ``dim`` and ``spacing`` come from the latent (shape x 4, affine spacing / 4). Latents made by
    ``configs/create_embeddings.json`` already have sidecars; this is for latents from other tools.

    Returns
    -------
    list[str]
        the sidecars written.
    """
    if (top_region is None) != (bottom_region is None):
        raise ValueError("give both --top_region and --bottom_region, or neither.")
    code = modality_code(modality, modality_mapping_json or _default_modality_mapping())
    folder = Path(embedding_dir)
    latents = sorted(folder.glob(f"*{LATENT_SUFFIX}")) if folder.is_dir() else []
    if not latents:
        raise ValueError(f"embedding_dir='{folder}' holds no *{LATENT_SUFFIX} latents.")
    written = []
    for latent in latents:
        target = sidecar_path(latent)
        if target.is_file() and not overwrite:
            continue
        image = _load(latent)
        content = make_sidecar(
            dim=[int(s) * LATENT_DOWNSAMPLE for s in image.shape[:3]],
            spacing=[s / LATENT_DOWNSAMPLE for s in _spacing(image)],
            modality=code,
            top_region_index=region_one_hot(top_region),
            bottom_region_index=region_one_hot(bottom_region),
        )
        _write_json(target, content)
        written.append(str(target))
    logger.info("wrote %d sidecars in %s", len(written), folder)
    return written


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # results are logged and written to files; fire would print the returned objects again
    fire.Fire({"check": check, "resample": resample, "datalist": datalist, "sidecars": sidecars}, serialize=lambda _: None)
