"""Tests of the CT mask generator (Path A, ct/mask_generation.py): size condition, sampling, decode, post-processing, resampling."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.data.utils import affine_to_spacing
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from bundle_helpers import BUNDLES_DIR, REPO_ROOT, bundle_scripts

BACKGROUND, LIVER, SPLEEN, PANCREAS, GALLBLADDER, STOMACH, SMALL_BOWEL, COLON, BODY = 0, 1, 3, 4, 10, 12, 19, 62, 200
HEPATIC_VESSEL, HEPATIC_TUMOR, PANCREATIC_TUMOR, AIRWAY = 25, 26, 24, 132
# A 6-channel stand-in for label_dict_124_to_132.json: channel -> raw MAISI id.
CHANNEL_TABLE = {"background": [0, BACKGROUND], "body": [1, BODY], "liver": [2, LIVER], "hepatic tumor": [3, HEPATIC_TUMOR],
                 "spleen": [4, SPLEEN], "colon": [5, COLON]}  # fmt: skip
LATENT_SHAPE = (4, 8, 8, 8)  # decodes to 32^3 at 1.5 mm
STEPS = 4
REQUEST = [["liver", 0.5], ["hepatic tumor", 0.3]]
DATABASE = np.array(
    [
        [0.25, 0.25, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1],
        [0.75, 0.75, 0.25, 0.25, 0.5, -1, -1, 0.25, -1, -1],
        [0.75, 0.75, 0.25, 0.25, 0.5, -1, -1, 0.25, -1, -1],  # a duplicate of row 1: ties go to row 1
    ]
)


NOISE_WEIGHT = 1.0
# (channel, centre, radius in voxels) of the spheres of the prior; each sphere lies inside the one before it
# in this list or inside the body.
PRIOR_SPHERES = ((1, (16, 16, 16), 13.0), (2, (11, 16, 14), 6.0), (3, (11, 16, 14), 2.5), (4, (22, 16, 16), 4.0),
                 (5, (17, 9, 22), 3.0))  # fmt: skip


def _anatomy_prior(shape, scale=10.0) -> torch.Tensor:
    """(1, 6, *shape) logits: a body ellipsoid holding a liver with a tumour, a spleen and a colon segment."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij"))
    logits = torch.zeros((1, len(CHANNEL_TABLE), *shape))
    parent = {1: 0, 2: 1, 3: 2, 4: 1, 5: 1}
    for channel, centre, radius in PRIOR_SPHERES:
        distance = (grid - torch.tensor(centre, dtype=torch.float32).reshape(3, 1, 1, 1)).norm(dim=0)
        logits[0, channel] = logits[0, parent[channel]] + scale * (1 - distance / radius)
    return logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mg():
    with bundle_scripts(BUNDLES_DIR / "maisi_ct_generative"):
        yield importlib.import_module("scripts.mask_generation")


@pytest.fixture(scope="module")
def label_dict(mg):
    return importlib.import_module("scripts.labels").load_label_dict()


@pytest.fixture(scope="module")
def networks(mg):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        autoencoder = AutoencoderKlMaisi(
            spatial_dims=3, in_channels=8, out_channels=len(CHANNEL_TABLE), latent_channels=4, num_channels=(8, 8, 8),
            num_res_blocks=(1, 1, 1), norm_num_groups=4, attention_levels=(False, False, False), use_convtranspose=True,
            num_splits=1, dim_split=1, norm_float16=False, save_mem=False,
        ).eval()  # fmt: skip
        unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=1, channels=(8, 16), attention_levels=(False, True),
            norm_num_groups=4, num_head_channels=(0, 8), with_conditioning=True, cross_attention_dim=10, upcast_attention=True,
        ).eval()  # fmt: skip
    # Random weights decode to label noise, which post-processing reduces to almost nothing. A fixed
    # anatomical logit prior (added to the decoder's output) gives the masks a body, organs and a tumour;
    # the network's own, seed-dependent output still moves the boundaries.
    prior = _anatomy_prior((32, 32, 32))
    autoencoder.decoder.register_forward_hook(lambda module, args, output: output * NOISE_WEIGHT + prior.to(output))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta", clip_sample=False
    )
    return mg.MaskGenerationNetworks(autoencoder, unet, scheduler, scale_factor=1.0055984258651733)


def _generate(mg, networks, seed=0, request=REQUEST, output_size=(16, 16, 24), spacing=(3.0, 3.0, 2.0)):
    return mg.generate_mask(
        networks, request, DATABASE, output_size, spacing, seed, "cpu",
        channel_to_label=CHANNEL_TABLE, latent_shape=LATENT_SHAPE, num_inference_steps=STEPS,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Size database and size condition
# ----------------------------------------------------------------------------------------------------------


def test_load_database_published_format(mg, tmp_path):
    entries = [{"organ_size": row.tolist(), "source": f"case_{i}"} for i, row in enumerate(DATABASE)]
    path = tmp_path / "all_anatomy_size_conditions.json"
    path.write_text(json.dumps(entries))
    database = mg.load_size_condition_database(path)
    assert database.sizes.shape == (3, 10) and len(database) == 3
    np.testing.assert_array_equal(database.sizes, DATABASE)
    assert database.entries[2] == {"source": "case_2"}


def test_load_database_other_supported_formats(mg, tmp_path):
    for name, entries in (("plain", DATABASE.tolist()), ("alias", [{"anatomy_size": r} for r in DATABASE.tolist()])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(entries))
        np.testing.assert_array_equal(mg.load_size_condition_database(path).sizes, DATABASE)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"organ_size": [0.1] * 10}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
        ([{"size": [0.1] * 10}], "'organ_size'"),
        ([{"organ_size": [0.1] * 9}], "list of 10 numbers"),
        ([{"organ_size": [0.1] * 9 + [None]}], "finite number"),
    ],
)
def test_load_database_rejects_unknown_formats(mg, tmp_path, content, message):
    path = tmp_path / "db.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        mg.load_size_condition_database(path)
    assert "all_anatomy_size_conditions_json" in str(error.value)


def test_load_database_missing_file_names_the_config_id(mg, tmp_path):
    with pytest.raises(FileNotFoundError, match="all_anatomy_size_conditions_json"):
        mg.load_size_condition_database(tmp_path / "missing.json")


def test_size_condition_nearest_row_then_user_overwrite(mg):
    # row 0: |0.25 - 0.75| + |-1 - 0.5| = 2.0; row 1: 0 + 0.25 = 0.25 -> row 1, then the user's two slots
    vector = mg.size_condition_vector([["liver", 0.75], ["hepatic tumor", 0.5]], DATABASE)
    expected = torch.tensor([[[0.75, 0.75, 0.25, 0.25, 0.5, -1, -1, 0.5, -1, -1]]], dtype=torch.float32)
    assert vector.shape == (1, 1, 10) and vector.dtype == torch.float32
    assert torch.equal(vector, expected)
    match = mg.match_size_condition([["liver", 0.75], ["hepatic tumor", 0.5]], DATABASE)
    assert (match.index, match.distance) == (1, 0.25)


def test_size_condition_counts_minus_one_as_given(mg):
    # hepatic tumor -1 matches row 0 exactly in that slot: row 0 distance 0.25, row 1 distance 1.25 + 0.25
    match = mg.match_size_condition([["liver", 0.5], ["hepatic tumor", -1]], DATABASE)
    assert match.index == 0 and match.distance == 0.25
    np.testing.assert_array_equal(match.vector, [0.25, 0.5, 0.5, 0.5, 0.5, -1, -1, -1, -1, -1])


def test_size_condition_ties_go_to_the_first_entry(mg):
    assert mg.match_size_condition([["gallbladder", 0.5]], DATABASE).index == 0  # rows 0 and 1 at 0.25
    assert mg.match_size_condition({"gallbladder": 0.75}, DATABASE).index == 1  # rows 1 and 2 at 0


def test_size_condition_rejects_bad_requests(mg):
    with pytest.raises(ValueError, match="controllable_anatomy_size=\\[\\]"):
        mg.size_condition_vector([], DATABASE)
    eleven = [[name, 0.5] for name in ("liver",) * 11]
    with pytest.raises(ValueError, match="11 entries; at most 10"):
        mg.size_condition_vector(eleven, DATABASE)
    with pytest.raises(ValueError, match="not a controllable anatomy"):
        mg.size_condition_vector([["spleen", 0.5]], DATABASE)


# ----------------------------------------------------------------------------------------------------------
# Sampling, decoding, the whole path
# ----------------------------------------------------------------------------------------------------------


def test_latent_is_seeded_by_the_generator(mg, networks):
    condition = mg.size_condition_vector(REQUEST, DATABASE)

    def latent(seed):
        generator = torch.Generator().manual_seed(seed)
        unet, scheduler = networks.diffusion_unet, networks.noise_scheduler
        return mg.generate_mask_latent(unet, scheduler, condition, LATENT_SHAPE, generator, "cpu", STEPS)

    first = latent(3)
    assert first.shape == (1, *LATENT_SHAPE) and first.dtype == torch.float32
    assert torch.equal(first, latent(3))
    assert not torch.equal(first, latent(4))


def test_latent_sampling_rejects_bad_inputs_before_sampling(mg, networks):
    condition = mg.size_condition_vector(REQUEST, DATABASE)
    unet, scheduler = networks.diffusion_unet, networks.noise_scheduler
    cpu = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="random generator is on 'cpu' but sampling runs on 'cuda'"):
        mg.generate_mask_latent(unet, scheduler, condition, LATENT_SHAPE, cpu, "cuda", STEPS)
    for steps in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"mask_generation_num_inference_steps={steps!r}"):
            mg.generate_mask_latent(unet, scheduler, condition, LATENT_SHAPE, cpu, "cpu", steps)
    with pytest.raises(ValueError, match=r"finite \(1, 1, 10\) tensor"):
        mg.generate_mask_latent(unet, scheduler, condition[..., :9], LATENT_SHAPE, cpu, "cpu", STEPS)
    with pytest.raises(ValueError, match=r"mask_generation_latent_shape=\[8, 8, 8\] is not allowed"):
        mg.generate_mask_latent(unet, scheduler, condition, LATENT_SHAPE[1:], cpu, "cpu", STEPS)


def test_ddim_overlay_samples_in_fewer_steps(mg, networks, caplog):
    # configs/inference_mask_ddim.json: the published DDPM betas, sampled with DDIM in 50 steps
    from monai.bundle import ConfigParser
    from monai.networks.schedulers import DDIMScheduler

    bundle = REPO_ROOT / "bundles" / "maisi_ct_generative" / "configs"
    parser = ConfigParser()
    parser.read_config([str(bundle / "inference.json"), str(bundle / "inference_mask_ddim.json")])
    ddim = parser.get_parsed_content("mask_generation_noise_scheduler")
    ddpm = ConfigParser(json.loads((bundle / "inference.json").read_text())).get_parsed_content("mask_generation_noise_scheduler")
    assert isinstance(ddim, DDIMScheduler) and parser["mask_generation_num_inference_steps"] == 50
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)  # the schedule the generator was trained with
    condition = mg.size_condition_vector(REQUEST, DATABASE)

    def latent(scheduler, seed, steps=STEPS):
        generator = torch.Generator().manual_seed(seed)
        return mg.generate_mask_latent(networks.diffusion_unet, scheduler, condition, LATENT_SHAPE, generator, "cpu", steps)

    with caplog.at_level("WARNING"):
        first = latent(ddim, 3)
    assert "below the 1000 steps" not in caplog.text  # the DDPM warning is for DDPM schedulers only
    assert first.shape == (1, *LATENT_SHAPE) and torch.isfinite(first).all()
    assert torch.equal(first, latent(ddim, 3)) and not torch.equal(first, latent(ddim, 4))
    assert len(ddim.timesteps) == STEPS and not torch.allclose(first, latent(ddpm, 3))


def test_decode_is_planned_for_every_output_channel(mg, networks, monkeypatch):
    planned = {}
    plan_decode = mg.plan_decode

    def spy(*args, **kwargs):
        planned.update(kwargs)
        return plan_decode(*args, **kwargs)

    monkeypatch.setattr(mg, "plan_decode", spy)
    latent = torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(0))
    mg.decode_mask(networks.autoencoder, latent, networks.scale_factor, CHANNEL_TABLE)
    assert planned["out_channels"] == len(CHANNEL_TABLE) == 6  # the decoder's channels, not the image decoder's 1


def test_decode_mask_is_argmax_mapped_to_maisi_ids(mg, networks):
    latent = torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(0))
    labels = mg.decode_mask(networks.autoencoder, latent, networks.scale_factor, CHANNEL_TABLE)
    assert labels.shape == (1, 1, 32, 32, 32) and labels.dtype == torch.int64
    with torch.no_grad():
        logits = networks.autoencoder.decode_stage_2_outputs(latent / networks.scale_factor)
    lookup = torch.tensor([BACKGROUND, BODY, LIVER, HEPATIC_TUMOR, SPLEEN, COLON])
    assert torch.equal(labels, lookup[logits.argmax(dim=1, keepdim=True)])
    with pytest.raises(ValueError, match="channel table does not match"):
        mg.decode_mask(networks.autoencoder, latent, networks.scale_factor, {0: 0, 1: BODY})


def test_generate_mask_geometry_and_ids(mg, networks):
    mask, info = _generate(mg, networks)
    assert mask.shape == (1, 16, 16, 24) and mask.dtype == torch.int16
    np.testing.assert_allclose(affine_to_spacing(mask.affine, r=3), (3.0, 3.0, 2.0))
    ids = set(torch.unique(mask).tolist())
    assert ids <= {label for _, label in CHANNEL_TABLE.values()}  # raw MAISI ids, nothing renumbered
    assert {LIVER, HEPATIC_TUMOR} <= ids
    assert info["label_ids"] == sorted(ids)
    assert info["size_condition"] == [0.75, 0.5, 0.25, 0.25, 0.5, -1, -1, 0.3, -1, -1]
    assert info["database_index"] == 1 and info["generated_shape"] == (32, 32, 32)
    assert info["generated_spacing"] == (1.5, 1.5, 1.5)
    assert info["requested"] == {LIVER: 0.5, HEPATIC_TUMOR: 0.3}


def test_generate_mask_same_seed_same_mask(mg, networks):
    first, info = _generate(mg, networks, seed=7)
    second, info_again = _generate(mg, networks, seed=7)
    assert torch.equal(first, second) and info == info_again
    other, _ = _generate(mg, networks, seed=8)
    assert not torch.equal(first, other)


def test_generate_mask_raises_on_a_lost_anatomy(mg, networks):
    # the 6-channel generator cannot produce a gallbladder
    with pytest.raises(ValueError, match="controllable_anatomy_size=.*'gallbladder' \\(id 10\\) is absent"):
        _generate(mg, networks, request=[["liver", 0.5], ["gallbladder", 0.5]])
    # one output voxel cannot hold both liver and hepatic tumour
    with pytest.raises(ValueError, match="controllable_anatomy_size=.*was lost when resampling"):
        _generate(mg, networks, output_size=(1, 1, 1), spacing=(1.5, 1.5, 1.5))


# ----------------------------------------------------------------------------------------------------------
# Post-processing, step by step on synthetic volumes
# ----------------------------------------------------------------------------------------------------------


def _torso(shape=(24, 24, 24)) -> np.ndarray:
    """A body box (2..21) holding a liver box, background around it."""
    volume = np.zeros(shape, dtype=np.int16)
    volume[2:22, 2:22, 2:22] = BODY
    volume[4:12, 4:12, 4:12] = LIVER
    return volume


def test_largest_component(mg):
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0:3, 0:3, 0:3] = True
    mask[5:9, 5:9, 5:9] = True
    mask[3, 3, 3] = True  # diagonal neighbour of the small block: 26-connected to it
    kept = mg.largest_component(mask)
    assert kept.sum() == 64 and kept[5:9, 5:9, 5:9].all()
    assert not mg.largest_component(np.zeros((4, 4, 4), dtype=bool)).any()


def test_keep_body_drops_fragments_outside_the_body(mg):
    volume = _torso()
    volume[0:2, 22:24, 22:24] = BODY  # a floating fragment
    volume[22, 10, 10] = BODY  # a one-voxel spur on the body surface
    out = mg.keep_body(volume)
    expected = _torso()
    np.testing.assert_array_equal(out, expected)


def test_keep_largest_components_relabels_fragments_as_body(mg):
    volume = _torso()
    volume[15:17, 15:17, 15:17] = LIVER  # a detached liver fragment
    volume[15:18, 4:7, 4:7] = SPLEEN
    out = mg.keep_largest_components(volume, [LIVER, SPLEEN, PANCREAS])
    assert (out[15:17, 15:17, 15:17] == BODY).all()
    assert (out[4:12, 4:12, 4:12] == LIVER).all() and (out[15:18, 4:7, 4:7] == SPLEEN).all()
    assert (out != volume).sum() == 8


def test_fill_tumor_closes_gaps_and_fills_cavities(mg):
    volume = _torso()
    volume[5:12, 5:12, 5:12] = HEPATIC_TUMOR
    volume[7:10, 7:10, 7:10] = LIVER  # a 3^3 cavity: closing alone would not fill it
    volume[5, 8, 8] = LIVER  # a one-voxel notch on the surface
    out = mg.fill_tumor(volume, HEPATIC_TUMOR)
    assert (out[5:12, 5:12, 5:12] == HEPATIC_TUMOR).all()
    assert (out[12:, :, :] == volume[12:, :, :]).all()


def test_replace_unrequested_tumors_uses_the_host_organ(mg, label_dict):
    volume = _torso()
    volume[6:8, 6:8, 6:8] = HEPATIC_TUMOR
    volume[14:20, 14:20, 14:20] = PANCREAS
    volume[16:18, 16:18, 16:18] = PANCREATIC_TUMOR
    out = mg.replace_unrequested_tumors(volume, keep=[PANCREATIC_TUMOR], label_dict=label_dict)
    assert (out[6:8, 6:8, 6:8] == LIVER).all()
    assert (out[16:18, 16:18, 16:18] == PANCREATIC_TUMOR).all()
    assert (mg.replace_unrequested_tumors(volume, keep=[], label_dict=label_dict)[16:18, 16:18, 16:18] == PANCREAS).all()


def test_remove_organs_and_hepatic_vessel(mg, label_dict):
    volume = _torso()
    volume[14:18, 14:18, 14:18] = GALLBLADDER
    volume[6, 6, 6:10] = HEPATIC_VESSEL
    out = mg.remove_organs(mg.hepatic_vessel_to_liver(volume, label_dict), [GALLBLADDER])
    assert (out[14:18, 14:18, 14:18] == BODY).all() and (out[4:12, 4:12, 4:12] == LIVER).all()


def test_connect_bowel_prunes_detached_bowel(mg, label_dict):
    volume = _torso()
    volume[13:20, 4:8, 4:8] = STOMACH
    volume[13:20, 8:12, 4:8] = COLON  # touches the stomach
    volume[14:16, 16:19, 16:19] = COLON  # detached
    volume[18:20, 16:19, 16:19] = SMALL_BOWEL  # detached
    out = mg.connect_bowel(volume, label_dict)
    assert (out[13:20, 8:12, 4:8] == COLON).all() and (out[13:20, 4:8, 4:8] == STOMACH).all()
    assert (out[14:16, 16:19, 16:19] == BODY).all() and (out[18:20, 16:19, 16:19] == BODY).all()


def test_close_organs_fills_small_holes(mg):
    volume = _torso()
    volume[8, 8, 8] = BODY
    volume[11, 6:8, 6] = SPLEEN  # a notch on the liver surface
    out = mg.close_organs(volume, [LIVER])
    assert (out[4:12, 4:12, 4:12] == LIVER).all()
    assert (out[13:, :, :] == volume[13:, :, :]).all()


def test_single_component_label_ids(mg, label_dict):
    ids = set(mg.single_component_label_ids(label_dict))
    assert {1, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 57, 58, 59} <= ids
    assert set(range(28, 33)) <= ids and set(range(33, 57)) | {127} <= ids  # lobes, vertebrae C1..L5 and S1
    assert not ids & {COLON, SMALL_BOWEL, HEPATIC_TUMOR, BODY, 63}  # bowel, tumours, body, ribs
    without_vertebrae = set(mg.single_component_label_ids(label_dict, include_vertebrae=False))
    assert without_vertebrae == ids - set(range(33, 57)) - {127}


def test_postprocess_generated_mask_end_to_end(mg, label_dict):
    volume = _torso()
    volume[0:2, 22:24, 22:24] = LIVER  # outside the body
    volume[15:17, 15:17, 15:17] = LIVER  # detached fragment
    volume[6:11, 6:11, 6:11] = HEPATIC_TUMOR  # requested, with a hole
    volume[8, 8, 8] = LIVER
    volume[14:20, 4:10, 14:20] = PANCREAS
    volume[16:18, 6:8, 16:18] = PANCREATIC_TUMOR  # not requested
    volume[4:8, 16:20, 4:8] = GALLBLADDER  # requested with -1
    volume[10, 10, 4:6] = HEPATIC_VESSEL
    requested = {LIVER: 0.5, HEPATIC_TUMOR: 0.3, GALLBLADDER: -1.0}
    out = mg.postprocess_generated_mask(torch.as_tensor(volume)[None], requested, label_dict)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 24, 24, 24) and out.dtype == torch.int16
    out = out[0].numpy()
    assert (out[0:2, 22:24, 22:24] == BACKGROUND).all()
    assert (out[15:17, 15:17, 15:17] == BODY).all()
    assert (out[6:11, 6:11, 6:11] == HEPATIC_TUMOR).all()
    assert (out[16:18, 6:8, 16:18] == PANCREAS).all()
    assert (out[4:8, 16:20, 4:8] == BODY).all()
    assert set(np.unique(out)) == {BACKGROUND, LIVER, PANCREAS, HEPATIC_TUMOR, BODY}
    assert (out[10, 10, 4:6] == LIVER).all()


def test_postprocess_keeps_airway_and_rejects_bad_input(mg, label_dict):
    volume = _torso()
    volume[14:20, 14:20, 10:14] = SPLEEN
    volume[16:18, 17, 10:14] = AIRWAY  # a slit inside the spleen that the spleen's closing would cover
    out = mg.postprocess_generated_mask(volume, {LIVER: 0.5}, label_dict)
    assert (out[16:18, 17, 10:14] == AIRWAY).all()
    with pytest.raises(ValueError, match="single 3D label map"):
        mg.postprocess_generated_mask(np.zeros((2, 4, 4, 4), dtype=np.int16), {}, label_dict)
