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
Prepare your own NIfTI images and masks for MAISI (``python -m scripts.data_prep <command> ...`` from the bundle).

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
- ``remap LABEL_DIR OUTPUT_DIR --mapping NAME_OR_JSON [--unmapped 200]``: another tool's label ids to MAISI
  ids (shipped: ``totalsegmentator_v2``, ``totalsegmentator_v2_mr``, ``totalsegmentator_v1``; or a user JSON
  ``{source_id: MAISI id or name}``), with a JSON report of what was mapped and what had no counterpart.
- ``body_mask IMAGE_DIR OUTPUT_DIR [--label_dir DIR]`` / ``body_mask LABEL_DIR OUTPUT_DIR --from_labels``: the
  body envelope (label 200) from the images (CT: air threshold, table removal, largest component, holes
  filled per slice; MR: an intensity threshold), added where the labels have none; or, without images, an
  approximate envelope around the labelled organs (``scripts.body_mask``).
- ``check_mask MASK_PATH [--spacing ...] [--output_size ...]``: the generation-time checks of a user mask
  (``scripts.mask_checks``): body label, MAISI ids, organ volumes, field of view, thin slabs, resampling.
- ``organ_volumes LABEL_DIR OUTPUT_JSON``: an organ-volume reference measured on a folder of masks (e.g. the
  extracted candidate-mask database), in the format ``check_mask`` reads.

Defaults follow the bundle: ``modality`` (and ``check_mask``'s ``spacing``/``output_size``) left unset take the
value of the bundle's ``configs/inference.json`` (``ct`` in maisi_ct_generative, ``mri_t1`` in
maisi_mr_generative), read when the command runs. Outputs are written atomically; ``remap`` and ``body_mask``
never write over their inputs and refuse existing outputs unless ``--overwrite True``.

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

from .body_mask import FROM_LABELS_MARGIN_MM, OPENING_MM, add_body_label, image_envelope, labels_envelope, voxel_spacing
from .checkpoint import atomic_write
from .constants import BODY_LABEL, BODY_REGIONS
from .embeddings import LATENT_DOWNSAMPLE, LATENT_SUFFIX, make_sidecar, modality_code, sidecar_path
from .label_remap import as_label_ids, load_mapping, remap_labels
from .mask_checks import MaskRequest, check_user_mask, load_organ_volume_reference, reference_from_summaries, summarize_mask

logger = logging.getLogger(__name__)

__all__ = [
    "body_mask",
    "bundle_default",
    "check",
    "check_mask",
    "datalist",
    "find_images",
    "main",
    "organ_volumes",
    "region_one_hot",
    "remap",
    "resample",
    "sidecars",
]

IMAGE_EXTENSIONS = (".nii.gz", ".nii")
CT_PAD_HU = -1000.0
_CT_AIR_HU = -500.0
_CT_MAX_PLAUSIBLE_HU = 4000.0
_BUNDLE_CONFIG = Path("configs") / "inference.json"
_REMAP_REPORT = "remap_report.json"
_BODY_MASK_REPORT = "body_mask_report.json"
_MASK_CHECK_REPORT = "mask_check_report.json"


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


def bundle_default(config_id: str, bundle_root: str | os.PathLike | None = None) -> Any:
    """
    The value of ``config_id`` in the bundle's ``configs/inference.json``, read now (not at import).

    This is how every ``data_prep`` default follows the bundle: ``modality`` is ``ct`` in maisi_ct_generative
    and ``mri_t1`` in maisi_mr_generative, from one file that both the generation and these commands read.

    Parameters
    ----------
    config_id
        a top-level id holding a plain JSON value (e.g. ``modality``, ``spacing``, ``output_size``).
    bundle_root
        the bundle folder; default: the folder above this ``scripts`` package.

    Raises
    ------
    ValueError
        the file is missing (e.g. the canonical ``common/maisi`` copy, which is not a bundle), or the id is
        missing or an expression; the message says to pass the value explicitly.
    """
    root = Path(bundle_root) if bundle_root is not None else Path(__file__).resolve().parent.parent
    config = root / _BUNDLE_CONFIG
    hint = f"give --{config_id} explicitly"
    if not config.is_file():
        raise ValueError(f"{config_id} is not given and {config} does not exist to take the bundle's default from; {hint}.")
    try:
        value = json.loads(config.read_text()).get(config_id)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_id} is not given and {config} is not readable JSON ({error}); {hint}.") from error
    if value is None or (isinstance(value, str) and value[:1] in ("$", "@", "%")):
        raise ValueError(f"{config_id} is not given and {config} holds no plain value for it ({value!r}); {hint}.")
    return value


def _or_bundle_default(config_id: str, value: Any) -> Any:
    if value is not None:
        return value
    value = bundle_default(config_id)
    logger.info("%s=%s (the bundle's default, configs/inference.json)", config_id, value)
    return value


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


def check(image_dir: str, report: str | None = None, modality: str | None = None, intensity: bool = True) -> dict[str, Any]:
    """
    Check a folder of NIfTI images for consistency and write a JSON report.

    Parameters
    ----------
    image_dir
        folder of ``.nii.gz``/``.nii`` images.
    report
        where the JSON report goes (default ``<image_dir>/data_check_report.json``).
    modality
        ``ct`` or an MR name: decides the intensity plausibility check (default: the bundle's modality).
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
    family = _family(_or_bundle_default("modality", modality))
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

    _save_nifti(target, array, affine)


def _save_nifti(target: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file atomically (mm units); 64-bit integers (which nibabel refuses) are stored as int32."""
    if array.dtype in (np.int64, np.uint64):
        if array.size and (int(array.min()) < np.iinfo(np.int32).min or int(array.max()) > np.iinfo(np.int32).max):
            raise ValueError(f"'{target}': values beyond the int32 range cannot be written as labels.")
        array = array.astype(np.int32)

    def write(tmp_name: str) -> None:
        image = nib.Nifti1Image(array, affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp_name)

    atomic_write(target, write, suffix=".nii.gz" if target.name.endswith(".nii.gz") else ".nii")


def _paired_labels(files: Sequence[Path], label_dir: str) -> dict[Path, Path]:
    """``<label_dir>/<image name>`` for every image, checked to exist and to share the image's grid."""
    labels = {}
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
    return labels


def resample(
    image_dir: str,
    output_dir: str,
    spacing: Sequence[float],
    shape: Sequence[int] | None = None,
    label_dir: str | None = None,
    modality: str | None = None,
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
        ``ct`` pads images with -1000 HU (air); MR names pad with 0. Default: the bundle's modality
        (``configs/inference.json``), so the MR bundle pads with 0.

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
    pad_value = CT_PAD_HU if _family(_or_bundle_default("modality", modality)) == "ct" else 0.0
    files = find_images(image_dir)
    labels = {} if label_dir is None else _paired_labels(files, label_dir)
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
    modality: str | None = None,
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
        Default: the bundle's modality (``configs/inference.json``).
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
    code = modality_code(_or_bundle_default("modality", modality), modality_mapping_json or _default_modality_mapping())
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
    modality: str | None = None,
    top_region: str | None = None,
    bottom_region: str | None = None,
    overwrite: bool = False,
    modality_mapping_json: str | None = None,
) -> list[str]:
    """
    Write the sidecar of every ``*_emb.nii.gz`` latent in ``embedding_dir`` that lacks one.

    ``dim`` and ``spacing`` come from the latent (shape x 4, affine spacing / 4). Latents made by
    ``configs/create_embeddings.json`` already have sidecars; this is for latents from other tools.
    ``modality`` defaults to the bundle's modality (``configs/inference.json``).

    Returns
    -------
    list[str]
        the sidecars written.
    """
    if (top_region is None) != (bottom_region is None):
        raise ValueError("give both --top_region and --bottom_region, or neither.")
    code = modality_code(_or_bundle_default("modality", modality), modality_mapping_json or _default_modality_mapping())
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


def _label_dict(label_dict_json: str | None) -> dict[str, int]:
    from .labels import load_label_dict

    return load_label_dict(label_dict_json)


def _outputs(inputs: Sequence[Path], output_dir: str, protected: Sequence[str | None], overwrite: bool) -> dict[Path, Path]:
    """``<output_dir>/<name>`` per input, refusing an output folder that is an input folder and existing outputs."""
    out = Path(output_dir)
    for folder in protected:
        if folder is not None and out.resolve() == Path(folder).resolve():
            raise ValueError(f"output_dir='{output_dir}' is an input folder; choose another folder (inputs are never written over).")
    targets = {path: out / path.name for path in inputs}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ValueError(f"output_dir='{output_dir}' already holds '{existing[0]}'{more}; choose another folder or pass --overwrite True.")
    return targets


def _label_array(path: Path, canonical: bool = False) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A 3D label file's integer ids and its image; ``canonical`` reorients it to RAS first (as generation loads it)."""
    image = _load(path)
    if len(image.shape) != 3:
        raise ValueError(f"label '{path}' has shape {image.shape}; a label map is 3D.")
    if canonical:
        image = nib.as_closest_canonical(image)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"label '{path}' cannot be read: {error}") from error
    return as_label_ids(data, f"label '{path}'"), image


def remap(
    label_dir: str,
    output_dir: str,
    mapping: str,
    unmapped: int = BODY_LABEL,
    report: str | None = None,
    overwrite: bool = False,
    label_dict_json: str | None = None,
) -> dict[str, Any]:
    """
    Map every label file of ``label_dir`` from another tool's ids to MAISI ids (``scripts.label_remap``).

    Parameters
    ----------
    label_dir
        folder of ``.nii.gz``/``.nii`` label maps in the source tool's numbering.
    output_dir
        where the remapped files go (same names, ``uint8``, same affine); not ``label_dir``.
    mapping
        a shipped mapping name (``totalsegmentator_v2``, ``totalsegmentator_v2_mr``, ``totalsegmentator_v1``)
        or a JSON file ``{source_id: MAISI id or MAISI name}``.
    unmapped
        the id of source ids without a MAISI counterpart: 200 (body, default) or 0 (background) or another
        MAISI id. Each such id is reported by name and voxel count.
    report
        the JSON report (default ``<output_dir>/remap_report.json``).
    overwrite
        replace existing files in ``output_dir``.
    label_dict_json
        the MAISI label dictionary (default: the bundle's ``configs/label_dict.json``).

    Returns
    -------
    dict
        the report: ``mapping``, ``source``, ``unmapped_value``, per file the mapped and unmapped source ids
        with voxel counts, and ``unmapped_total`` (per source id: name, voxels, files).

    Raises
    ------
    ValueError
        an unknown mapping, a bad mapping entry or ``unmapped`` value, an unreadable or non-integer label
        file, or an output folder that is the input folder or already holds the outputs.
    """
    label_dict = _label_dict(label_dict_json)
    if isinstance(unmapped, bool) or not isinstance(unmapped, int) or (unmapped != 0 and unmapped not in label_dict.values()):
        raise ValueError(f"unmapped={unmapped!r} is not allowed; use 200 (body), 0 (background) or another MAISI id of label_dict.json.")
    table = load_mapping(mapping, label_dict)
    files = find_images(label_dir)
    targets = _outputs(files, output_dir, [label_dir], overwrite)
    entries, totals = [], {}
    for path in files:
        data, image = _label_array(path)
        result = remap_labels(data, table, unmapped=unmapped)
        _save_nifti(targets[path], result.labels, image.affine)
        entries.append({"file": str(path), "output": str(targets[path]), "mapped": result.mapped, "unmapped": result.unmapped})
        for source, info in result.unmapped.items():
            total = totals.setdefault(source, {"source_name": info["source_name"], "reason": info["reason"], "voxels": 0, "files": 0})
            total["voxels"] += info["voxels"]
            total["files"] += 1
        logger.info("remapped %s: %d source ids mapped, %d without a MAISI counterpart", path.name, len(result.mapped), len(result.unmapped))
    content = {
        "mapping": table.name,
        "source": table.source,
        "unmapped_value": unmapped,
        "files": entries,
        "unmapped_total": {str(k): v for k, v in sorted(totals.items())},
    }
    report_path = Path(report) if report is not None else Path(output_dir) / _REMAP_REPORT
    _write_json(report_path, json.loads(json.dumps(content, default=str)))
    for source, info in sorted(totals.items()):
        logger.warning(
            "source id %d (%s): %d voxels in %d file(s) have no MAISI counterpart (%s) and were set to %d",
            source, info["source_name"] or "unnamed", info["voxels"], info["files"], info["reason"], unmapped,
        )
    logger.info("%d label maps remapped with %s, report: %s", len(files), table.name, report_path)
    return content


def body_mask(
    input_dir: str,
    output_dir: str,
    label_dir: str | None = None,
    from_labels: bool = False,
    modality: str | None = None,
    threshold: float | None = None,
    opening_mm: float = OPENING_MM,
    margin_mm: float = FROM_LABELS_MARGIN_MM,
    report: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """
    Add the body envelope (label 200) to label maps, or write envelope-only masks (``scripts.body_mask``).

    Parameters
    ----------
    input_dir
        the images (CT in HU, or MR); with ``from_labels``, the label maps instead.
    output_dir
        where the new masks go (same file names as the inputs); never an input folder.
    label_dir
        label maps with the images' names and grids: 200 is written where the envelope has no label, every
        existing label is kept. Without it, the output holds 200 inside the envelope and 0 outside.
    from_labels
        no image: build an approximate envelope around the labelled organs of ``input_dir``'s label maps,
        ``margin_mm`` beyond the outer organs.
    modality
        ``ct`` or an MR name (default: the bundle's modality): CT thresholds air, MR an intensity fraction.
    threshold
        CT: HU (default -500); MR: fraction of the 99th intensity percentile (default 0.1).
    opening_mm
        in-plane opening radius that cuts the scanner table and thin objects off the body (default 10 mm).
    margin_mm
        ``from_labels`` only: envelope margin around the organs (default 15 mm, for fat and skin).
    report
        the JSON report (default ``<output_dir>/body_mask_report.json``).
    overwrite
        replace existing files in ``output_dir``.

    Returns
    -------
    dict
        the report: method, parameters, ``approximation`` (True for ``from_labels``) and per file the envelope
        volume, the volume labelled 200 and the thresholded volume removed (table, objects outside the body).

    Raises
    ------
    ValueError
        no inputs, unreadable files, a missing label or one on another grid, ``label_dir`` with
        ``from_labels``, an output folder that is an input folder or already holds the outputs.
    """
    if from_labels and label_dir is not None:
        raise ValueError("from_labels=True reads the label maps from input_dir; do not give label_dir with it.")
    family = None if from_labels else _family(_or_bundle_default("modality", modality))
    files = find_images(input_dir)
    labels = {} if label_dir is None else _paired_labels(files, label_dir)
    targets = _outputs(files, output_dir, [input_dir, label_dir], overwrite)
    entries = []
    for path in files:
        if from_labels:
            data, image = _label_array(path)
            envelope = labels_envelope(data, image.affine, margin_mm=float(margin_mm))
            existing = data
        else:
            image = _load(path)
            envelope = image_envelope(np.asarray(image.dataobj, dtype=np.float32), image.affine, family, threshold, float(opening_mm))
            existing = _label_array(labels[path])[0] if path in labels else None
        result = add_body_label(existing, envelope.mask)
        _save_nifti(targets[path], result, image.affine)
        voxel_ml = float(np.prod(voxel_spacing(image.affine))) / 1000.0
        added = int(np.count_nonzero(envelope.mask & (existing == 0))) if existing is not None else int(np.count_nonzero(envelope.mask))
        entries.append(
            {
                "file": str(path),
                "label": str(labels[path]) if path in labels else None,
                "output": str(targets[path]),
                "envelope_ml": round(int(np.count_nonzero(envelope.mask)) * voxel_ml, 2),
                "body_label_added_ml": round(added * voxel_ml, 2),
                "removed_outside_body_ml": round(envelope.removed_voxels * voxel_ml, 2),
                "threshold": envelope.threshold,
            }
        )
        logger.info("%s: envelope %.0f mL, %.0f mL labelled %d", path.name, entries[-1]["envelope_ml"], entries[-1]["body_label_added_ml"], BODY_LABEL)
    note = None
    if from_labels:
        note = (
            f"approximation: without an image the body outline is not known; the envelope closes the gaps between labelled organs "
            f"and reaches {margin_mm:g} mm beyond the outer ones. Run body_mask on the images for the real outline."
        )
        logger.warning(note)
    content = {
        "method": "labels" if from_labels else "image",
        "modality_family": family,
        "approximation": bool(from_labels),
        "note": note,
        "body_label": BODY_LABEL,
        "parameters": {"threshold": threshold, "opening_mm": opening_mm} if not from_labels else {"margin_mm": margin_mm},
        "files": entries,
    }
    report_path = Path(report) if report is not None else Path(output_dir) / _BODY_MASK_REPORT
    _write_json(report_path, content)
    logger.info("%d body masks written to %s, report: %s", len(entries), output_dir, report_path)
    return content


def check_mask(
    mask_path: str,
    spacing: Sequence[float] | None = None,
    output_size: Sequence[int] | None = None,
    modality: str | None = None,
    strict: bool = False,
    organ_volume_reference_json: str | None = None,
    report: str | None = None,
    label_dict_json: str | None = None,
) -> list[dict[str, Any]]:
    """
    Run the generation-time checks of ``scripts.mask_checks`` on one mask and report the findings.

    Parameters
    ----------
    mask_path
        the label file you would pass as ``mask_path``.
    spacing, output_size
        the generation's ``spacing``/``output_size`` (default: the bundle's ``configs/inference.json``).
    modality
        default: the bundle's modality.
    strict
        as ``mask_check_strict``: a missing body label refuses.
    organ_volume_reference_json
        organ volumes to compare with (default: the bundle's ``configs/organ_volume_reference.json``).
    report
        the JSON report (default ``<mask folder>/mask_check_report.json``).

    Returns
    -------
    list[dict]
        the findings (``MaskFinding.to_dict()``); empty for a good mask. Refusals are logged as errors.
    """
    path = Path(mask_path)
    if not path.is_file():
        raise ValueError(f"mask_path={mask_path} does not exist.")
    request = MaskRequest(
        spacing=tuple(_three("spacing", _or_bundle_default("spacing", spacing), float)),
        output_size=tuple(_three("output_size", _or_bundle_default("output_size", output_size), int)),
        modality_family=_family(_or_bundle_default("modality", modality)),
        strict=bool(strict),
    )
    labels, image = _label_array(path, canonical=True)
    summary = summarize_mask(labels, image.affine, path)
    findings = check_user_mask(summary, request, _label_dict(label_dict_json), load_organ_volume_reference(organ_volume_reference_json))
    content = [finding.to_dict() for finding in findings]
    report_path = Path(report) if report is not None else path.parent / _MASK_CHECK_REPORT
    _write_json(report_path, {"mask_path": str(path), "findings": content})
    for finding in findings:
        (logger.error if finding.severity == "refuse" else logger.warning)("[%s] %s%s", finding.code, finding.message, f" Fix: {finding.fix}" if finding.fix else "")
    logger.info("%d finding(s) for %s, report: %s", len(findings), path, report_path)
    return content


def organ_volumes(label_dir: str, output: str, min_masks: int = 5, label_dict_json: str | None = None) -> dict[str, Any]:
    """
    Measure an organ-volume reference on a folder of MAISI masks (e.g. the extracted candidate-mask database).

    Per MAISI organ found in at least ``min_masks`` masks (not cut by their field of view): median volume and
    the band [5th percentile / 2, 95th percentile x 2], written in the format of
    ``organ_volume_reference.json``; pass it to ``check_mask --organ_volume_reference_json``.
    """
    label_dict = _label_dict(label_dict_json)
    summaries = []
    for path in find_images(label_dir):
        labels, image = _label_array(path, canonical=True)
        summaries.append(summarize_mask(labels, image.affine, path))
    content = reference_from_summaries(summaries, label_dict, min_masks=int(min_masks))
    _write_json(Path(output), content)
    logger.info("organ volumes of %d organs from %d masks: %s", len(content["organs"]), len(summaries), output)
    return content


COMMANDS = {
    "check": check,
    "resample": resample,
    "datalist": datalist,
    "sidecars": sidecars,
    "remap": remap,
    "body_mask": body_mask,
    "check_mask": check_mask,
    "organ_volumes": organ_volumes,
}


def main(argv: Sequence[str] | None = None) -> None:
    """The ``fire`` CLI; ``argv`` (without the program name) defaults to the command line."""
    import fire

    # results are logged and written to files; fire would print the returned objects again
    fire.Fire(COMMANDS, command=None if argv is None else list(argv), serialize=lambda _: None)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
