"""maisi_ct_generative end to end on the CPU with tiny networks, a synthetic mask database and a user mask."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle_helpers import BUNDLES_DIR, bundle_scripts, run_bundle, run_in_process
from demo.maisi_presets import MAISI_TINY_AUTOENCODER, MAISI_TINY_CONTROLNET, MAISI_TINY_UNET

BUNDLE = BUNDLES_DIR / "maisi_ct_generative"
OUTPUT_SIZE = [256, 256, 128]
SPACING = [1.5, 1.5, 2.0]
DATABASE_LABELS = {1, 3, 200}  # liver, spleen, body

TINY = {
    **MAISI_TINY_AUTOENCODER,  # the decode runs at the full 256x256x128 (CT) size
    **MAISI_TINY_UNET,
    **MAISI_TINY_CONTROLNET,
    "controlnet_def#conditioning_embedding_num_channels": [2, 4, 4],
    # pinned: with null the planner follows the RAM free at the start (whole-volume decode or halo tiles, whose
    # tile statistics change the values slightly), so reruns would not be comparable on a busy machine
    "memory_budget_gb": 64.0,
}
VERSION_CONFIGS = {"rflow-ct": ["inference.json"], "ddpm-ct": ["inference.json", "inference_ddpm_ct.json"]}


def _write_mask(path, shape, spacing, labelled_boxes):
    mask = np.zeros(shape, dtype=np.uint8)
    for label, box in labelled_boxes:
        mask[box] = label
    nib.save(nib.Nifti1Image(mask, np.diag([*spacing, 1.0])), str(path))
    return mask


def _body_with_organs(shape):
    x, y, z = shape
    return [
        (200, np.s_[x // 8 : -x // 8, y // 8 : -y // 8, :]),
        (1, np.s_[x // 4 : x // 2, y // 4 : y // 2, z // 4 : 3 * z // 4]),
        (3, np.s_[x // 2 + 8 : 3 * x // 4, y // 4 : y // 2, z // 4 : z // 2]),
    ]


def _tiny_weights(models_dir, version):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in VERSION_CONFIGS[version]])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in TINY.items():
        parser[key] = value
    torch.manual_seed(0)
    paths = {}
    for net_id, file_name, key in (
        ("autoencoder_def", "autoencoder.pt", None),
        ("diffusion_unet_def", f"unet_{version}.pt", "unet_state_dict"),
        ("controlnet_def", f"controlnet_{version}.pt", "controlnet_state_dict"),
    ):
        with bundle_scripts(BUNDLE):  # the UNet's _target_ is scripts.attention.DiffusionModelUNetMaisi
            network = parser.get_parsed_content(net_id)
        for parameter in network.parameters():  # non-zero everywhere, so the ControlNet and UNet matter
            if parameter.dim() > 1 and not parameter.detach().abs().sum():
                torch.nn.init.normal_(parameter, std=0.02)
        state = network.state_dict()
        payload = state if key is None else {key: state}
        if key == "unet_state_dict":
            payload["scale_factor"] = torch.tensor(1.0)
        torch.save(payload, models_dir / file_name)
        paths[net_id] = models_dir / file_name
    return {
        "trained_autoencoder_path": str(paths["autoencoder_def"]),
        "trained_diffusion_path": str(paths["diffusion_unet_def"]),
        "trained_controlnet_path": str(paths["controlnet_def"]),
    }


def build_workspace(root):
    """A database with one exact-geometry mask, a user mask at another geometry, and tiny weights of both versions."""
    masks_dir = root / "datasets" / "masks"
    masks_dir.mkdir(parents=True)
    _write_mask(masks_dir / "case_exact.nii.gz", OUTPUT_SIZE, SPACING, _body_with_organs(OUTPUT_SIZE))
    entries = [
        {
            "pseudo_label_filename": "case_exact.nii.gz",
            "spacing": SPACING,
            "dim": OUTPUT_SIZE,
            "label_list": sorted(DATABASE_LABELS),
            "top_region_index": [0, 0, 1, 0],
            "bottom_region_index": [0, 0, 1, 0],
        }
    ]
    (root / "datasets" / "database.json").write_text(json.dumps(entries))
    user_shape, user_spacing = [128, 128, 64], [3.0, 3.0, 4.0]
    _write_mask(root / "user_mask.nii.gz", user_shape, user_spacing, _body_with_organs(user_shape))
    (root / "models").mkdir()
    weights = {version: _tiny_weights(root / "models", version) for version in VERSION_CONFIGS}
    return root, weights


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("maisi_ct"))


def _overrides(root, weights, output_dir, **extra):
    return {
        "bundle_root": str(BUNDLE),
        "output_dir": str(output_dir),
        "all_mask_files_json": str(root / "datasets" / "database.json"),
        "all_mask_files_base_dir": str(root / "datasets" / "masks"),
        "output_size": OUTPUT_SIZE,
        "spacing": SPACING,
        "num_inference_steps": 2,
        "quality_check_max_attempts": 1,
        "augment_masks": False,
        "progress": False,
        **TINY,
        **weights,
        **extra,
    }


def _load(report_path):
    report = json.loads(report_path.read_text())
    return report, report["samples"]


def test_database_mask_pairs_outputs_and_determinism(workspace, tmp_path):
    root, weights = workspace
    # the command line once (python -m monai.bundle run), in-process otherwise
    run_bundle(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "a", num_output_samples=2, quality_check_max_attempts=2))
    run_in_process(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "b", num_output_samples=1))
    report, samples = _load(tmp_path / "a" / "generation_report.json")
    assert [s["seed"] for s in samples] == [100_003, 100_004]  # the second attempt's seeds
    assert report["settings"]["version"] == "rflow-ct" and all("decode" in s["decode_plan"] for s in samples)
    database_mask = nib.load(root / "datasets" / "masks" / "case_exact.nii.gz").get_fdata()
    for sample in samples:
        image = nib.load(sample["image"])
        label = nib.load(sample["label"])
        data = np.asarray(image.dataobj)
        labels = np.asarray(label.dataobj)
        assert data.shape == tuple(OUTPUT_SIZE) and data.dtype == np.int16 and image.get_data_dtype() == np.int16
        assert data.min() >= -1000 and data.max() <= 1000
        assert (data[labels == 0] == -1000).all()
        assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0} | DATABASE_LABELS
        np.testing.assert_array_equal(labels, database_mask)  # raw ids, not renumbered, no augmentation
        np.testing.assert_allclose(image.affine, np.diag([*SPACING, 1.0]))
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert Image.open(sample["preview"]).mode in ("RGB", "RGBA")
        quality = sample["quality_check"]  # random tiny networks: the HU check fails, so every attempt is used
        assert quality["passed"] is False and quality["attempts"] == 2 and quality["failed_organs"]
        assert sample["mask_source"].startswith("database:case_exact.nii.gz")
    second_attempt = np.asarray(nib.load(samples[0]["image"]).dataobj)
    _, single = _load(tmp_path / "b" / "generation_report.json")
    assert single[0]["seed"] == 0 and single[0]["quality_check"]["attempts"] == 1
    first_attempt = np.asarray(nib.load(single[0]["image"]).dataobj)
    assert not np.array_equal(second_attempt, first_attempt)  # a retry draws new noise
    assert not np.array_equal(np.asarray(nib.load(samples[1]["image"]).dataobj), second_attempt)
    run_in_process(BUNDLE, ["inference.json"], _overrides(root, weights["rflow-ct"], tmp_path / "c", num_output_samples=1))
    _, repeated = _load(tmp_path / "c" / "generation_report.json")
    np.testing.assert_array_equal(np.asarray(nib.load(repeated[0]["image"]).dataobj), first_attempt)


def test_user_mask_ddpm_and_guidance(workspace, tmp_path):
    root, weights = workspace
    overrides = _overrides(
        root, weights["ddpm-ct"], tmp_path / "ddpm", mask_path=str(root / "user_mask.nii.gz"), image_output_ext=".nii"
    )
    run_in_process(BUNDLE, VERSION_CONFIGS["ddpm-ct"], overrides)
    report, samples = _load(tmp_path / "ddpm" / "generation_report.json")
    assert report["settings"]["version"] == "ddpm-ct"
    sample = samples[0]
    assert sample["mask_source"].startswith("user:") and sample["image"].endswith(".nii")
    labels = np.asarray(nib.load(sample["label"]).dataobj)
    assert labels.shape == tuple(OUTPUT_SIZE) and set(np.unique(labels)) <= {0} | DATABASE_LABELS
    assert {1, 3} <= set(np.unique(labels))

    guided = _overrides(root, weights["rflow-ct"], tmp_path / "cfg", cfg_guidance_scale=2.0)
    unguided = _overrides(root, weights["rflow-ct"], tmp_path / "nocfg")
    run_in_process(BUNDLE, ["inference.json"], guided)
    run_in_process(BUNDLE, ["inference.json"], unguided)
    images = [np.asarray(nib.load(_load(tmp_path / d / "generation_report.json")[1][0]["image"]).dataobj) for d in ("cfg", "nocfg")]
    assert not np.array_equal(*images)  # the unconditional branch (modality 0) changes the result


# ---------------------------------------------------------------------------------------------------- Path A
# The mask generator (controllable_anatomy_size) through the bundle config. A random tiny generator decodes
# to label noise that post-processing erases, so the tiny mask autoencoder is crafted: its last GroupNorm
# outputs a constant (weight 0, bias 1) and its last 3x3x3 convolution (zero padding) turns the number of
# in-volume neighbours n of each voxel (27 inside, 18 on a face, 12 on an edge, 8 at a corner) into
# logits: background 10, body n, pancreas 2n - 22. The decoded mask is therefore known exactly: pancreas
# inside, a one-voxel body shell, background at the 8 corners, whatever the seed. Channel 2 holds raw id 4
# (pancreas) and channel 3 raw id 1 (liver, never winning), so a renumbering would show.
PANCREAS, LIVER, BODY = 4, 1, 200
MASK_CHANNELS = {"background": [0, 0], "body": [1, BODY], "pancreas": [2, PANCREAS], "liver": [3, LIVER]}
MASK_LOGITS = {0: (0.0, 10.0), 1: (1.0, 0.0), 2: (2.0, -22.0), 3: (0.0, -100.0)}  # channel: (per neighbour, bias)
MASK_LATENT_SHAPE = [4, 8, 8, 8]  # decodes to 32^3 voxels at 1.5 mm
TINY_MASK_GENERATOR = {
    "mask_generation_autoencoder_def#num_channels": [8, 8, 8],
    "mask_generation_autoencoder_def#num_res_blocks": [1, 1, 1],
    "mask_generation_autoencoder_def#norm_num_groups": 4,
    "mask_generation_autoencoder_def#out_channels": len(MASK_CHANNELS),
    "mask_generation_autoencoder_def#num_splits": 1,
    "mask_generation_diffusion_def#channels": [8, 16],
    "mask_generation_diffusion_def#attention_levels": [False, True],
    "mask_generation_diffusion_def#num_head_channels": [0, 8],
    "mask_generation_diffusion_def#num_res_blocks": 1,
    "mask_generation_diffusion_def#norm_num_groups": 4,
    "mask_generation_latent_shape": MASK_LATENT_SHAPE,
    "mask_generation_num_inference_steps": 2,
}


def _expected_generated_mask() -> np.ndarray:
    """The crafted generator's mask on its own 32^3, 1.5 mm grid."""
    size = 4 * MASK_LATENT_SHAPE[1]
    inside = np.ones((size,) * 3)
    neighbours = np.pad(inside, 1)
    counts = sum(
        neighbours[1 + dx : 1 + dx + size, 1 + dy : 1 + dy + size, 1 + dz : 1 + dz + size]
        for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
    )  # fmt: skip
    logits = np.stack([a * counts + b for a, b in (MASK_LOGITS[c] for c in range(len(MASK_CHANNELS)))])
    lookup = np.array([label for _, label in sorted(MASK_CHANNELS.values())])
    return lookup[logits.argmax(axis=0)]


def _crafted_mask_generator(root):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    for key, value in TINY_MASK_GENERATOR.items():
        parser[key] = value
    torch.manual_seed(1)
    autoencoder = parser.get_parsed_content("mask_generation_autoencoder_def")()  # the defs are factories
    unet = parser.get_parsed_content("mask_generation_diffusion_def")()
    norm, conv = autoencoder.decoder.blocks[-2], autoencoder.decoder.blocks[-1].conv.conv
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        conv.weight.zero_()
        for channel, (per_neighbour, bias) in MASK_LOGITS.items():
            conv.weight[channel, 0] = per_neighbour
            conv.bias[channel] = bias
    torch.save(autoencoder.state_dict(), root / "mask_autoencoder.pt")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0)}, root / "mask_unet.pt")
    (root / "mask_channels.json").write_text(json.dumps(MASK_CHANNELS))
    sizes = [[0.5, 0.5, 0.5, 0.3, 0.5, -1, -1, -1, -1, -1], [0.2, 0.2, 0.2, 0.2, 0.2, -1, -1, -1, -1, -1]]
    (root / "sizes.json").write_text(json.dumps([{"organ_size": row} for row in sizes]))
    return {
        "trained_mask_generation_autoencoder_path": str(root / "mask_autoencoder.pt"),
        "trained_mask_generation_diffusion_path": str(root / "mask_unet.pt"),
        "all_anatomy_size_condtions_json": str(root / "sizes.json"),
        "label_dict_remap_json": str(root / "mask_channels.json"),
        **TINY_MASK_GENERATOR,
    }


def test_generated_mask_pairs_through_the_bundle(workspace, tmp_path):
    """Path A: controllable_anatomy_size -> generated mask -> CT; .nrrd/.mha outputs; determinism; lost organs."""
    import itk

    root, weights = workspace
    generator = _crafted_mask_generator(tmp_path)
    request = [["pancreas", 0.4], ["colon", -1]]

    def overrides(output_dir, **extra):
        base = _overrides(root, weights["rflow-ct"], output_dir, controllable_anatomy_size=request, **generator)
        return {**base, "all_mask_files_json": str(tmp_path / "no_database.json"), **extra}  # Path A reads no database

    run_in_process(BUNDLE, ["inference.json"], overrides(tmp_path / "itk", image_output_ext=".nrrd", label_output_ext=".mha"))
    report, samples = _load(tmp_path / "itk" / "generation_report.json")
    sample = samples[0]
    assert sample["mask_source"] == "generated" and sample["seed"] == 0
    assert report["settings"]["requests"][0]["controllable_anatomy_size"] == request
    assert sample["image"].endswith("_image.nrrd") and sample["label"].endswith("_label.mha")
    image_itk, label_itk = itk.imread(sample["image"]), itk.imread(sample["label"])
    image = itk.array_from_image(image_itk).transpose(2, 1, 0)  # itk arrays are (Z, Y, X)
    labels = itk.array_from_image(label_itk).transpose(2, 1, 0)
    assert image.shape == labels.shape == tuple(OUTPUT_SIZE)
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    for written in (image_itk, label_itk):  # RAS diag(spacing) as ITK's LPS: direction diag(-1, -1, 1), origin 0
        np.testing.assert_allclose(tuple(written.GetSpacing()), SPACING)
        np.testing.assert_allclose(np.asarray(written.GetDirection()), np.diag([-1.0, -1.0, 1.0]))
        np.testing.assert_allclose(tuple(written.GetOrigin()), (0.0, 0.0, 0.0))

    # the written label map is the crafted generator's mask, resampled (nearest) to the requested geometry
    from monai.data import MetaTensor
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    generated = MetaTensor(torch.from_numpy(_expected_generated_mask())[None].float(), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    expected = ResizeWithPadOrCrop(OUTPUT_SIZE)(Spacing(pixdim=SPACING, mode="nearest")(generated))[0].numpy()
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, PANCREAS, BODY}  # raw ids: the requested pancreas and the body envelope
    assert (labels == PANCREAS).sum() > 1000
    assert image.min() == -1000 and image.max() <= 1000
    assert (image[labels == 0] == -1000).all()  # background outside the body
    assert (image[labels == BODY] > -1000).any()  # the body is generated, not blanked

    run_in_process(BUNDLE, ["inference.json"], overrides(tmp_path / "nifti"))  # same seed, NIfTI outputs
    _, again = _load(tmp_path / "nifti" / "generation_report.json")
    np.testing.assert_array_equal(np.asarray(nib.load(again[0]["image"]).dataobj), image)
    np.testing.assert_array_equal(np.asarray(nib.load(again[0]["label"]).dataobj), labels)
    np.testing.assert_allclose(nib.load(again[0]["image"]).affine, np.diag([*SPACING, 1.0]))

    # liver is controllable but the crafted generator never draws it: refused, nothing written
    with pytest.raises(Exception) as lost:
        run_in_process(BUNDLE, ["inference.json"], overrides(tmp_path / "lost", controllable_anatomy_size=[["pancreas", 0.4], ["liver", 0.5]]))
    message = "\n".join(str(e) for e in _chain(lost.value))
    assert "controllable_anatomy_size=" in message and "'liver' (id 1) is absent from the generated mask" in message
    assert not list((tmp_path / "lost").glob("*_image.*"))


def _chain(error):
    """An exception and its causes (MONAI wraps errors raised while resolving a config)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__

