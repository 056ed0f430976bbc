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
Checks of a user mask (``mask_path``) for image-from-mask generation, run before any weight loads.

Pure functions: they take a :class:`MaskSummary` (one pass over the label map: voxel counts and bounding
boxes per id, spacing, shape), the requested geometry (:class:`MaskRequest`), the label dictionary and the
organ-volume reference, and return :class:`MaskFinding` objects (``to_dict()`` for the run report).
``severity`` is ``"warn"`` (generation goes on, the report records it) or ``"refuse"`` (the caller raises
before loading weights, :func:`raise_for_refusals`).

Finding codes (``FINDING_CODES``):

- ``no_body_label``: no body label 200 (MR also accepts 500). Warns; refuses when ``mask_check_strict`` is
  true. Fix: ``scripts.data_prep body_mask``.
- ``unknown_label_ids``: ids that are not MAISI ids (not in ``label_dict.json``, or an unused ``dummy``
  placeholder: the ids of another tool's numbering land there, e.g. TotalSegmentator's 2 = right kidney).
  Refuses. Fix: ``scripts.data_prep remap``.
- ``organ_volume_out_of_range``: an organ (not cut by the mask's field of view) outside the reference
  band of ``organ_volume_reference.json`` at the mask's spacing. Warns.
- ``field_of_view_out_of_range``: the requested field of view (``output_size`` x ``spacing``) outside the
  range of the published presets (``PUBLISHED_FIELD_OF_VIEW_MM``). Warns.
- ``labels_in_thin_slab``: labels (or the whole mask) present in a slab no thicker than ``THIN_SLAB_MM``
  along z while wide in-plane: annotated on a few slices only. Warns.
- ``geometry_resampled``: the mask's spacing or shape differ from ``spacing``/``output_size``; says how it
  is resampled and cropped/padded and how much labelled anatomy a crop cuts off. Warns.

The mask is a label map with axes (x, y, z), z the axial axis, as ``masks.load_label_file`` gives it (RAS).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .body_mask import voxel_spacing
from .constants import BACKGROUND_LABEL, BODY_LABEL, MR_CONTROLNET_LABEL_MAP
from .label_remap import as_label_ids

__all__ = [
    "FINDING_CODES",
    "PUBLISHED_FIELD_OF_VIEW_MM",
    "STRICT_CONFIG_ID",
    "MaskFinding",
    "MaskRequest",
    "MaskSummary",
    "OrganVolume",
    "check_body_label",
    "check_field_of_view",
    "check_geometry",
    "check_label_ids",
    "check_organ_volumes",
    "check_thin_slab",
    "check_user_mask",
    "load_organ_volume_reference",
    "placeholder_ids",
    "raise_for_refusals",
    "reference_from_summaries",
    "summarize_mask",
]

WARN, REFUSE = "warn", "refuse"
STRICT_CONFIG_ID = "mask_check_strict"
FINDING_CODES = (
    "no_body_label",
    "unknown_label_ids",
    "organ_volume_out_of_range",
    "field_of_view_out_of_range",
    "labels_in_thin_slab",
    "geometry_resampled",
)
# the body id of the CT/MR label dictionary (500), which MR masks may carry instead of 200
MR_BODY_LABEL = next(source for source, target in MR_CONTROLNET_LABEL_MAP.items() if target == BODY_LABEL)
# Fields of view (mm, min and max) of the published presets and defaults (NV-Generate-CTMR config_infer_*.json
# and config_maisi_diff_model_*.json): CT x/y 256 (ddpm-ct default 256 x 1.0) to 435 (rflow-ct 256 x 1.7), z 96
# (ddpm-ct 128 x 0.75) to 512 (every 512-mm preset); MR 90-380 mm per axis (the published recommended MR fields
# of view). The training data's range is not published; outside these figures quality is untested.
PUBLISHED_FIELD_OF_VIEW_MM = {"ct": ((256.0, 435.0), (256.0, 435.0), (96.0, 512.0)), "mr": ((90.0, 380.0),) * 3}
THIN_SLAB_MM = 10.0  # a label no thicker than this along z ...
SLAB_ASPECT = 4.0  # ... while at least this many times wider in-plane looks annotated on a few slices
SPACING_RELATIVE_TOLERANCE = 0.01  # spacings within 1% count as equal
_MAX_LISTED = 12
_ORGAN_REFERENCE_FILE = "organ_volume_reference.json"


@dataclass(frozen=True)
class MaskFinding:
    """
    One finding about a user mask.

    Attributes
    ----------
    code
        one of ``FINDING_CODES``.
    severity
        ``"warn"`` or ``"refuse"``.
    message
        names ``mask_path`` and the figures.
    fix
        the command or setting that fixes it (``None`` when nothing needs fixing, e.g. a resampling note).
    figures
        the numbers behind the message (JSON-serialisable).
    """

    code: str
    severity: str
    message: str
    fix: str | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict for the run report."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix, "figures": json.loads(json.dumps(dict(self.figures)))}


@dataclass(frozen=True)
class MaskRequest:
    """
    What the generation asks for.

    Attributes
    ----------
    spacing, output_size
        the ``spacing`` (mm) and ``output_size`` config ids.
    modality_family
        ``"ct"`` or ``"mr"``.
    strict
        the ``mask_check_strict`` config id: refuse a mask without a body label instead of warning.
    """

    spacing: tuple[float, float, float]
    output_size: tuple[int, int, int]
    modality_family: str = "ct"
    strict: bool = False


@dataclass(frozen=True)
class MaskSummary:
    """
    What the checks need to know about a label map, from one pass over it (:func:`summarize_mask`).

    Attributes
    ----------
    path
        the file (``mask_path``), for the messages.
    shape, spacing
        (x, y, z) voxels and mm.
    voxel_counts
        label id (> 0) -> voxels.
    boxes
        label id -> ((x0, x1), (y0, y1), (z0, z1)), half-open voxel ranges.
    """

    path: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    voxel_counts: Mapping[int, int]
    boxes: Mapping[int, tuple[tuple[int, int], ...]]

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def field_of_view_mm(self) -> tuple[float, ...]:
        """Shape x spacing along each axis."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    def extent_mm(self, label_id: int) -> tuple[float, ...]:
        """The label's bounding-box size (mm) along each axis."""
        return tuple((b - a) * s for (a, b), s in zip(self.boxes[label_id], self.spacing))

    def touches_z_edge(self, label_id: int) -> bool:
        """Whether the label reaches the first or last slice (its organ may be cut by the field of view)."""
        low, high = self.boxes[label_id][2]
        return low == 0 or high == self.shape[2]

    def foreground_box(self) -> tuple[tuple[int, int], ...]:
        """Bounding box of all labels."""
        boxes = list(self.boxes.values())
        return tuple((min(b[axis][0] for b in boxes), max(b[axis][1] for b in boxes)) for axis in range(3))


@dataclass(frozen=True)
class OrganVolume:
    """One entry of the organ-volume reference: the MAISI names summed, typical volume and accepted band (mL)."""

    name: str
    label_names: tuple[str, ...]
    typical_ml: float
    low_ml: float
    high_ml: float
    source: str


def summarize_mask(labels: np.ndarray, affine: np.ndarray, mask_path: str | os.PathLike) -> MaskSummary:
    """
    Count the voxels and find the bounding box of every id of a label map (one ``bincount``, one ``find_objects``).

    Parameters
    ----------
    labels
        (x, y, z) or (1, x, y, z) integer label map (numpy or torch).
    affine
        its 4x4 voxel-to-world affine (the spacing is taken from its column norms).
    mask_path
        the file it came from, for the messages.

    Raises
    ------
    ValueError
        not a 3D label map of non-negative integers, or no labelled voxel.
    """
    array = np.asarray(labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"mask_path={mask_path} has shape {array.shape}; a label map is 3D.")
    array = as_label_ids(array, f"mask_path={mask_path}")
    counts = np.bincount(array.ravel())
    ids = [int(i) for i in np.nonzero(counts)[0] if i != BACKGROUND_LABEL]
    if not ids:
        raise ValueError(f"mask_path={mask_path} has no foreground label.")
    objects = ndimage.find_objects(array)
    boxes = {i: tuple((s.start, s.stop) for s in objects[i - 1]) for i in ids}
    return MaskSummary(
        path=str(mask_path),
        shape=tuple(int(n) for n in array.shape),  # type: ignore[arg-type]
        spacing=voxel_spacing(affine),
        voxel_counts={i: int(counts[i]) for i in ids},
        boxes=boxes,
    )


def placeholder_ids(label_dict: Mapping[str, int]) -> frozenset[int]:
    """
    The ``dummy`` ids of ``label_dict.json`` that no MAISI model uses: 2, 16, 18, 20 and 21 with the shipped file.

    ``dummy6``..``dummy8`` (129-131) are excluded: the MR ControlNet gets the BraTS tumour regions on them
    (``constants.MR_CONTROLNET_LABEL_MAP``) and the CT mask generator writes "kidney mass" as 129.
    """
    used = set(MR_CONTROLNET_LABEL_MAP.values())
    return frozenset(int(i) for name, i in label_dict.items() if name.lower().startswith("dummy") and int(i) not in used)


def _names(label_dict: Mapping[str, int]) -> dict[int, str]:
    return {int(i): name for name, i in label_dict.items()}


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _mask_folder(summary: MaskSummary) -> str:
    return str(Path(summary.path).parent)


def check_body_label(summary: MaskSummary, request: MaskRequest) -> list[MaskFinding]:
    """``no_body_label`` when the mask has no body label (warn, or refuse with ``request.strict``)."""
    body_ids = {BODY_LABEL, MR_BODY_LABEL} if request.modality_family == "mr" else {BODY_LABEL}
    if body_ids & set(summary.voxel_counts):
        return []
    folder = _mask_folder(summary)
    severity = REFUSE if request.strict else WARN
    consequence = "refused because mask_check_strict is true" if request.strict else "generation goes on (set mask_check_strict to true to refuse such masks)"
    label = f"{BODY_LABEL} (or {MR_BODY_LABEL})" if request.modality_family == "mr" else f"{BODY_LABEL}"
    message = (
        f"mask_path={summary.path} has no body label {label}: MAISI's ControlNet was trained on masks where every body voxel "
        f"without an organ label is {BODY_LABEL}, and it generates poor images from masks without it; {consequence}."
    )
    fix = (
        f"python -m scripts.data_prep body_mask IMAGE_DIR {folder}_body --label_dir {folder}  (IMAGE_DIR: the images the masks "
        f"were made from), or without images: python -m scripts.data_prep body_mask {folder} {folder}_body --from_labels; "
        "then set mask_path to the new file"
    )
    return [MaskFinding("no_body_label", severity, message, fix, {"body_label": BODY_LABEL, "label_ids": sorted(summary.voxel_counts), STRICT_CONFIG_ID: request.strict})]


def check_label_ids(summary: MaskSummary, label_dict: Mapping[str, int], request: MaskRequest) -> list[MaskFinding]:
    """``unknown_label_ids`` (refuse) for ids that are not MAISI ids or are unused placeholders."""
    allowed = {int(i) for i in label_dict.values()} - placeholder_ids(label_dict)
    if request.modality_family == "mr":
        allowed |= set(MR_CONTROLNET_LABEL_MAP)
    unknown = sorted(set(summary.voxel_counts) - allowed)
    if not unknown:
        return []
    names = _names(label_dict)
    described = [f"{i} ({summary.voxel_counts[i]} voxels{', placeholder ' + names[i] if i in names else ''})" for i in unknown]
    message = (
        f"mask_path={summary.path} holds {len(unknown)} label id(s) that are not MAISI ids of label_dict.json: {_listing(described)}. "
        "A mask in another tool's numbering (e.g. TotalSegmentator, where 2 is the right kidney) must be remapped to MAISI ids first."
    )
    folder = _mask_folder(summary)
    fix = (
        f"python -m scripts.data_prep remap {folder} {folder}_maisi --mapping totalsegmentator_v2  (or another shipped mapping, "
        "or a JSON {source_id: MAISI id or name}); then set mask_path to the new file"
    )
    figures = {"unknown_ids": unknown, "voxels": {str(i): summary.voxel_counts[i] for i in unknown}}
    return [MaskFinding("unknown_label_ids", REFUSE, message, fix, figures)]


def load_organ_volume_reference(path: str | os.PathLike | None = None) -> list[OrganVolume]:
    """
    Read an organ-volume reference (default: the bundle's ``organ_volume_reference.json``).

    Raises
    ------
    ValueError
        the file is missing, not JSON, or an entry lacks ``labels``/``typical_ml``/``low_ml``/``high_ml``.
    """
    if path is None:
        from .labels import default_data_path

        path = default_data_path(_ORGAN_REFERENCE_FILE)
    try:
        content = json.loads(Path(path).read_text())
        organs = content["organs"]
        return [
            OrganVolume(
                name=name,
                label_names=tuple(entry["labels"]),
                typical_ml=float(entry["typical_ml"]),
                low_ml=float(entry["low_ml"]),
                high_ml=float(entry["high_ml"]),
                source=str(entry.get("source", "")),
            )
            for name, entry in organs.items()
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"organ volume reference {path} is not readable ({error!r}); see {_ORGAN_REFERENCE_FILE} for the format.") from error


def check_organ_volumes(summary: MaskSummary, label_dict: Mapping[str, int], reference: Iterable[OrganVolume]) -> list[MaskFinding]:
    """
    ``organ_volume_out_of_range`` (warn) for every reference organ outside its band.

    Organs reaching the first or last slice are skipped: the field of view may cut them.
    """
    findings = []
    for organ in reference:
        ids = [int(label_dict[n]) for n in organ.label_names if n in label_dict and int(label_dict[n]) in summary.voxel_counts]
        if not ids or any(summary.touches_z_edge(i) for i in ids):
            continue
        volume = sum(summary.voxel_counts[i] for i in ids) * summary.voxel_ml
        if organ.low_ml <= volume <= organ.high_ml:
            continue
        side = "smaller" if volume < organ.low_ml else "larger"
        message = (
            f"mask_path={summary.path}: {organ.name} (label {', '.join(map(str, ids))}) measures {volume:.1f} mL at the mask's spacing "
            f"{list(summary.spacing)} mm, much {side} than the reference (typical {organ.typical_ml:g} mL, expected "
            f"{organ.low_ml:g}-{organ.high_ml:g} mL). A wrong spacing in the file header, a mask in another tool's numbering, or a "
            "partly labelled organ give such figures; generation follows the mask as it is."
        )
        fix = f"check the mask's spacing (python -m scripts.data_prep check {_mask_folder(summary)}) and its numbering (python -m scripts.data_prep remap ...)"
        figures = {"organ": organ.name, "label_ids": ids, "volume_ml": round(volume, 2), "typical_ml": organ.typical_ml, "low_ml": organ.low_ml, "high_ml": organ.high_ml, "mask_spacing_mm": list(summary.spacing)}
        findings.append(MaskFinding("organ_volume_out_of_range", WARN, message, fix, figures))
    return findings


def check_field_of_view(summary: MaskSummary, request: MaskRequest) -> list[MaskFinding]:
    """``field_of_view_out_of_range`` (warn) when ``output_size`` x ``spacing`` leaves the published range on any axis."""
    ranges = PUBLISHED_FIELD_OF_VIEW_MM[request.modality_family]
    fov = [n * s for n, s in zip(request.output_size, request.spacing)]
    outside = [axis for axis, (value, (low, high)) in enumerate(zip(fov, ranges)) if not low <= value <= high]
    if not outside:
        return []
    axes = "xyz"
    detail = "; ".join(f"{axes[a]} {fov[a]:g} mm (published {ranges[a][0]:g}-{ranges[a][1]:g} mm)" for a in outside)
    message = (
        f"the requested field of view (output_size={list(request.output_size)} x spacing={list(request.spacing)}) with mask_path={summary.path} "
        f"is outside the fields of view of the published {request.modality_family.upper()} presets: {detail}; the mask itself spans "
        f"{' x '.join(f'{v:g}' for v in summary.field_of_view_mm)} mm. Quality outside that range is untested."
    )
    fix = "choose spacing so that output_size x spacing stays in the published range (larger spacing for a larger field of view)"
    figures = {"output_fov_mm": fov, "mask_fov_mm": list(summary.field_of_view_mm), "published_range_mm": [list(r) for r in ranges], "axes_outside": [axes[a] for a in outside]}
    return [MaskFinding("field_of_view_out_of_range", WARN, message, fix, figures)]


def check_thin_slab(summary: MaskSummary, label_dict: Mapping[str, int], request: MaskRequest) -> list[MaskFinding]:
    """``labels_in_thin_slab`` (warn) for labels present in only a few slices while wide in-plane."""
    names = _names(label_dict)
    body_ids = {BODY_LABEL, MR_BODY_LABEL}
    z_spacing = request.spacing[2]
    foreground = summary.foreground_box()
    whole_z = (foreground[2][1] - foreground[2][0]) * summary.spacing[2]
    slabs = []
    if whole_z <= THIN_SLAB_MM:
        slabs.append(("all labels", foreground, whole_z))
    else:
        for i in sorted(summary.voxel_counts):
            if i in body_ids or summary.touches_z_edge(i):
                continue
            extent = summary.extent_mm(i)
            if extent[2] <= THIN_SLAB_MM and max(extent[0], extent[1]) >= SLAB_ASPECT * extent[2]:
                slabs.append((f"{names.get(i, 'id')} ({i})", summary.boxes[i], extent[2]))
    if not slabs:
        return []
    described = [f"{name}: {box[2][1] - box[2][0]} slice(s), {thick:g} mm along z" for name, box, thick in slabs]
    message = (
        f"mask_path={summary.path}: {_listing(described)}, across a much wider extent in-plane: such labels look annotated on a few "
        f"slices only. Generation resamples the mask to z spacing {z_spacing:g} mm, where they cover about "
        f"{', '.join(str(max(1, round(t / z_spacing))) for _, _, t in slabs[:_MAX_LISTED])} slice(s), and conditions on them as thin plates; "
        "the slices around them carry no such label."
    )
    fix = "label the organs in every slice they appear in (e.g. with a 3D segmentation tool), or remove the partial labels"
    figures = {"labels": [name for name, _, _ in slabs], "thickness_mm": [round(t, 3) for _, _, t in slabs], "thin_slab_mm": THIN_SLAB_MM}
    return [MaskFinding("labels_in_thin_slab", WARN, message, fix, figures)]


def _resampled_size(size: int, source_mm: float, target_mm: float) -> int:
    """Voxels after MONAI ``Spacing`` resampling: the span between the end voxel centres, rescaled, plus one."""
    return max(1, int(np.round((size - 1) * source_mm / target_mm + 1.0)))


def check_geometry(summary: MaskSummary, request: MaskRequest) -> list[MaskFinding]:
    """``geometry_resampled`` (warn) when the mask's spacing or shape differ: what resampling and cropping/padding do to it."""
    same_spacing = all(abs(a - b) <= SPACING_RELATIVE_TOLERANCE * b for a, b in zip(summary.spacing, request.spacing))
    if same_spacing and tuple(summary.shape) == tuple(request.output_size):
        return []
    axes = "xyz"
    foreground = summary.foreground_box()
    steps, cut = [], {}
    resampled = []
    for axis in range(3):
        source, target, out = summary.spacing[axis], request.spacing[axis], request.output_size[axis]
        n = summary.shape[axis] if same_spacing else _resampled_size(summary.shape[axis], source, target)
        resampled.append(n)
        if n > out:
            start = (n - out) // 2
            scale = 1.0 if same_spacing else source / target
            low, high = foreground[axis][0] * scale, (foreground[axis][1] - 1) * scale + 1.0  # voxel centres map by the scale
            lost = (max(0.0, start - low) * target, max(0.0, high - (start + out)) * target)
            steps.append(f"{axes[axis]} cropped by {n - out} voxels ({(n - out) * target:g} mm)")
            if lost[0] > 0 or lost[1] > 0:
                cut[axes[axis]] = [round(lost[0], 1), round(lost[1], 1)]
        elif n < out:
            steps.append(f"{axes[axis]} padded by {out - n} voxels ({(out - n) * target:g} mm) of background")
    fov = " x ".join(f"{v:g}" for v in summary.field_of_view_mm)
    request_fov = " x ".join(f"{n * s:g}" for n, s in zip(request.output_size, request.spacing))
    resampling = "keeps its spacing" if same_spacing else f"is resampled (nearest neighbour) to spacing {list(request.spacing)} mm, about {resampled} voxels"
    message = (
        f"mask_path={summary.path} has spacing {[round(s, 4) for s in summary.spacing]} mm and shape {list(summary.shape)} (field of view "
        f"{fov} mm), not spacing={list(request.spacing)} / output_size={list(request.output_size)} ({request_fov} mm): it {resampling}, "
        f"then centre-cropped/padded to output_size ({'; '.join(steps) if steps else 'no crop or pad'})."
    )
    if cut:
        message += " The crop cuts labelled anatomy off: " + "; ".join(f"{a} {lo:g} mm at the low end, {hi:g} mm at the high end" for a, (lo, hi) in cut.items()) + "."
    fix = None if not cut else "choose spacing/output_size whose field of view holds the labelled region, or crop the mask around the region you want"
    figures = {
        "mask_spacing_mm": list(summary.spacing),
        "mask_shape": list(summary.shape),
        "spacing": list(request.spacing),
        "output_size": list(request.output_size),
        "resampled_shape": resampled,
        "labelled_anatomy_cut_mm": cut,
    }
    return [MaskFinding("geometry_resampled", WARN, message, fix, figures)]


def check_user_mask(
    summary: MaskSummary, request: MaskRequest, label_dict: Mapping[str, int], reference: Iterable[OrganVolume] | None = None
) -> list[MaskFinding]:
    """
    Every check, in the order of ``FINDING_CODES``.

    Parameters
    ----------
    summary
        the mask (:func:`summarize_mask`).
    request
        requested geometry, modality family and strictness.
    label_dict
        MAISI name -> id (``label_dict.json``).
    reference
        organ volumes (:func:`load_organ_volume_reference`); ``None`` reads the bundle's file.

    Returns
    -------
    list[MaskFinding]
        every finding; empty for a good mask.
    """
    organs = load_organ_volume_reference() if reference is None else reference
    return [
        *check_body_label(summary, request),
        *check_label_ids(summary, label_dict, request),
        *check_organ_volumes(summary, label_dict, organs),
        *check_field_of_view(summary, request),
        *check_thin_slab(summary, label_dict, request),
        *check_geometry(summary, request),
    ]


def raise_for_refusals(findings: Iterable[MaskFinding]) -> None:
    """
    Raise when any finding refuses the mask.

    Raises
    ------
    ValueError
        listing every refusing finding's message and fix.
    """
    refusals = [f for f in findings if f.severity == REFUSE]
    if refusals:
        raise ValueError(" ".join(f"[{f.code}] {f.message} Fix: {f.fix}." for f in refusals))


def reference_from_summaries(summaries: Iterable[MaskSummary], label_dict: Mapping[str, int], min_masks: int = 5) -> dict[str, Any]:
    """
    An organ-volume reference (the format of ``organ_volume_reference.json``) measured on a set of masks.

    For each MAISI organ present, not cut by the field of view, in at least ``min_masks`` masks: ``typical_ml`` is
    the median volume and the band is [5th percentile / 2, 95th percentile x 2].

    Returns
    -------
    dict
        JSON-ready; write it and pass its path as the reference.
    """
    names = _names(label_dict)
    skip = placeholder_ids(label_dict) | {BODY_LABEL}
    volumes: dict[int, list[float]] = {}
    count = 0
    for summary in summaries:
        count += 1
        for i, voxels in summary.voxel_counts.items():
            if i in names and i not in skip and not summary.touches_z_edge(i):
                volumes.setdefault(i, []).append(voxels * summary.voxel_ml)
    organs = {}
    for i in sorted(volumes):
        values = np.asarray(volumes[i])
        if values.size < min_masks:
            continue
        p5, p50, p95 = (float(v) for v in np.percentile(values, [5, 50, 95]))
        organs[names[i]] = {
            "labels": [names[i]],
            "typical_ml": round(p50, 2),
            "low_ml": round(p5 / 2, 2),
            "high_ml": round(p95 * 2, 2),
            "source": f"measured on {values.size} of {count} masks (median; band = 5th percentile / 2 .. 95th percentile x 2)",
        }
    return {
        "description": "Organ volumes measured on a folder of masks (scripts.data_prep organ_volumes).",
        "origin": f"{count} masks; organs reaching the first or last slice are not measured",
        "units": "mL",
        "organs": organs,
    }
