"""The miniature lab's core (tests/benchmarks/lab): procedural subjects, pixels-as-latents, micro models of the
real classes with the pack's patch, and the evaluation measures. Fast: no training here."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parent / "benchmarks"))

from lab import evaluation, subjects as S  # noqa: E402
from lab.micro_models import build_micro_image_encoder, build_micro_model, parameter_count  # noqa: E402


def test_subjects_and_scenes_are_pure_functions_of_their_index():
    for i in (0, 1, 12345, S.HELD_OUT_SUBJECTS[7]):
        assert torch.equal(S.subject(i), S.subject(i))
    pair = S.make_pairs(3, S.TRAIN_SUBJECTS, 10, seed=4)[2]
    assert S.make_pairs(3, S.TRAIN_SUBJECTS, 10, seed=4)[2] == pair
    assert torch.equal(S.scene(pair), S.scene(pair))
    assert not torch.equal(S.subject(0), S.subject(1))


def test_thousands_of_distinct_subjects_whose_shape_is_visible():
    glyphs = torch.stack([S.subject(i) for i in range(3000)])
    assert glyphs.shape == (3000, 1, S.SUBJECT_PX, S.SUBJECT_PX) and glyphs.abs().max() <= 1
    flat = glyphs.flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distance.min() > 0.1  # no two alike, not merely unequal in the last bits
    shapes = {tuple((g[0] != g[0, 0, 0]).flatten().tolist()) for g in glyphs}  # foreground layouts alone
    assert len(shapes) > 2500
    contrast = flat.max(dim=1).values - flat.min(dim=1).values
    assert contrast.min() >= 0.8


def test_training_and_held_out_subjects_never_overlap():
    train = S.make_pairs(6000, S.TRAIN_SUBJECTS, 3000, seed=1)
    held = S.make_pairs(64, S.HELD_OUT_SUBJECTS, 64, seed=2)
    train_ids, held_ids = {p.subject_id for p in train}, {p.subject_id for p in held}
    assert len(train_ids) == 3000 and len(held_ids) == 64 and not train_ids & held_ids
    train_images = {S.subject(i).numpy().tobytes() for i in train_ids}
    assert not any(S.subject(i).numpy().tobytes() in train_images for i in held_ids)
    assert not {p.background_id for p in train} & {p.background_id for p in held}


def test_space_to_depth_is_exactly_inverted_and_keeps_the_region_whole():
    pixels = torch.randn(5, 1, S.SCENE_PX, S.SCENE_PX)
    latent = S.space_to_depth(pixels)
    assert latent.shape == (5, 4, S.SCENE_PX // 2, S.SCENE_PX // 2)
    assert torch.equal(S.depth_to_space(latent), pixels)
    assert torch.equal(latent[0, :, 1, 2], pixels[0, 0, 2:4, 4:6].flatten())  # one cell = one 2x2 block
    pair = S.make_pairs(1, S.TRAIN_SUBJECTS, 1, seed=9)[0]
    cells = S.space_to_depth(S.region_mask(pair))
    assert torch.equal(cells.amin(0), cells.amax(0))  # every latent cell is wholly inside or outside the region
    region = cells[0].bool()
    assert int(region.sum()) == (S.SUBJECT_PX // 2) ** 2
    inside = S.space_to_depth(S.scene(pair))[:, region]
    assert torch.equal(inside, S.space_to_depth(S.subject(pair.subject_id)).flatten(1))


def test_the_micro_model_is_comfyuis_unet_and_runs_the_packs_patch_through_a_model_patcher():
    import comfy.model_patcher
    import comfy.sample
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from model_patches.anylogo import RecyclingSettings, build_patch

    model, patcher = build_micro_model(seed=0)
    assert type(model.diffusion_model) is UNetModel and isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert 0.9e6 < parameter_count(model.diffusion_model) < 1.3e6
    assert model.diffusion_model.input_blocks[0][0].in_channels == 9
    again, _ = build_micro_model(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    positive = [[torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(1)), {}]]
    negative = [[torch.zeros(1, 3, 64), {}]]
    latent = torch.zeros(1, 4, 8, 8)

    def sample(m):
        noise = comfy.sample.prepare_noise(latent, 3)
        return comfy.sample.sample(m, noise, 3, 2.0, "euler", "normal", positive, negative, latent, seed=3,
                                   disable_pbar=True)

    plain = sample(patcher)
    subject = S.space_to_depth(S.subject(5))[None]
    results = {}
    for threshold in (0.0, 1.0):
        patched = patcher.clone()
        patch = build_patch(patched, subject, RecyclingSettings(threshold=threshold, record_attention=True))
        patch.install(patched)
        results[threshold] = (sample(patched), patch.recorder)
    assert torch.equal(results[0.0][0], plain)  # blocked flow is the unpatched model
    out, recorder = results[1.0]
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)
    assert sorted(recorder.per_layer) == ["output0.0", "output1.0", "output2.0", "output3.0"]
    assert torch.equal(sample(patcher), plain)  # the original is untouched


def test_the_micro_image_encoder_is_comfyuis_dinov2_and_gives_the_trainers_token_groups():
    from lab import anylogo_data

    encoder = build_micro_image_encoder(seed=0)
    pairs = S.make_pairs(3, S.HELD_OUT_SUBJECTS, 3, seed=2)
    data = anylogo_data.build(pairs, encoder)
    assert type(encoder.model).__name__ == "Dinov2Model"
    assert len(data.tokens) == 4 and data.tokens[0].shape == (3, 1 + 4 + 1, 32)  # cls + 2x2 patches + scene
    assert data.z0.shape == (3, 4, 8, 8) and data.concat.shape == (3, 5, 8, 8) and data.subject.shape == (3, 4, 4, 4)
    masked = data.concat[:, 1:] * data.concat[:, :1]
    assert torch.equal(masked, torch.zeros_like(masked))  # the region is hidden from the masked scene
    swapped = anylogo_data.build(pairs, encoder, [pairs[1].subject_id, pairs[2].subject_id, pairs[0].subject_id])
    assert torch.equal(swapped.z0, data.z0) and torch.equal(swapped.subject[0], data.subject[1])
    assert torch.allclose(swapped.tokens[0][0, :-1], data.tokens[0][1, :-1], atol=1e-5)  # subject tokens move
    assert torch.allclose(swapped.tokens[0][:, -1], data.tokens[0][:, -1], atol=1e-5)    # scene token stays


def test_identification_scores_chance_when_candidates_tie_and_finds_the_lowest():
    tied = evaluation.identification(torch.ones(6, 8))
    assert torch.allclose(tied["hit"], torch.full((6,), 1 / 8))
    errors = torch.tensor([[0.1, 0.5, 0.7], [0.9, 0.2, 0.4]])
    ident = evaluation.identification(errors)
    assert ident["hit"].tolist() == [1.0, 0.0]
    assert torch.allclose(ident["other"], torch.tensor([0.6, 0.3]))
    assert evaluation.region_error(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2),
                                   torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])).item() == pytest.approx(1.0)
    p = evaluation.paired(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.5, 2.0]))
    assert p["mean_diff"] == pytest.approx(-0.1667, abs=1e-3) and p["a_lower"] == pytest.approx(2 / 3)


def test_the_lossy_encoder_view_keeps_block_means_only():
    from lab.anylogo_data import coarse_view

    glyphs = torch.stack([S.subject(i) for i in range(4)])
    assert torch.equal(coarse_view(glyphs, 1), glyphs)
    coarse = coarse_view(glyphs, 4)
    assert coarse.shape == glyphs.shape
    assert torch.allclose(coarse[:, :, :4, :4], glyphs[:, :, :4, :4].mean(dim=(2, 3), keepdim=True).expand(-1, -1, 4, 4))
    assert torch.allclose(coarse.mean(dim=(2, 3)), glyphs.mean(dim=(2, 3)), atol=1e-6)


def test_the_selectivity_probe_computes_its_equation_and_is_uniform_for_content_blind_queries():
    from lab.attention_probe import attention_statistics, region_tokens

    g = torch.Generator().manual_seed(0)
    q, k, k_sub = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g), torch.randn(2, 2, 6, generator=g)
    region = torch.tensor([[True, False, False, True], [False, True, True, True]])
    stats = attention_statistics(q, k, k_sub, heads=2, region=region)
    # reference: per head, softmax over [k; k_sub], written out with explicit loops
    shares, entropies, inside = [], [], []
    for b in range(2):
        for h in range(2):
            for i in range(4):
                logits = torch.stack([q[b, i, 3 * h:3 * h + 3] @ key[3 * h:3 * h + 3] / 3 ** 0.5
                                      for key in torch.cat([k[b], k_sub[b]])])
                p = logits.softmax(0)
                within = p[4:] / p[4:].sum()
                shares.append(float(p[4:].sum()))
                entropies.append(float(-(within * within.log()).sum() / torch.log(torch.tensor(2.0))))
                inside.append(bool(region[b, i]))
    mean = lambda xs, sel: sum(x for x, s in zip(xs, inside) if s == sel) / sum(1 for s in inside if s == sel)  # noqa: E731
    assert stats["region_share"] == pytest.approx(mean(shares, True), abs=1e-5)  # float32 vs float32: rounding
    assert stats["outside_share"] == pytest.approx(mean(shares, False), abs=1e-5)
    assert stats["subject_entropy"] == pytest.approx(mean(entropies, True), abs=1e-5)
    assert stats["key_ratio"] == pytest.approx(2 / 6)
    blind = attention_statistics(torch.zeros(2, 4, 6), k, k_sub, heads=2, region=region)  # zero queries: uniform
    assert blind["region_share"] == pytest.approx(2 / 6, abs=1e-6) and blind["subject_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert blind["content_entropy"] == pytest.approx(1.0, abs=1e-6)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 4:8] = 1
    assert region_tokens(mask, 16).view(4, 4).int().tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]


def micro_anylogo_inputs():
    """(micro model, 2 held-out pairs, decoder RecyclingLayout, DINOv2 projection, noised scenes, sigmas, subject
    noise): the inputs of one AnyLogo forward on the micro UNet, seeded."""
    from lab import anylogo_data
    from lab.micro_models import MICRO_DINOV2
    from model_patches.image_context import ImageProjection
    from train.anylogo_step import RecyclingLayout

    model, _ = build_micro_model(seed=1)
    data = anylogo_data.build(S.make_pairs(2, S.HELD_OUT_SUBJECTS, 2, seed=2), build_micro_image_encoder(seed=0))
    layout = RecyclingLayout.of(model, "decoder", False, len(data.tokens))
    projection = ImageProjection(MICRO_DINOV2["hidden_size"], layout.context_dim)
    g = torch.Generator().manual_seed(4)
    sigma = model.model_sampling.sigmas[[500, 800]].float()
    x = data.z0 + torch.randn(data.z0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    subject_noise = torch.randn(data.subject.shape, generator=g)
    return model, data, layout, projection, x, sigma, subject_noise


def test_the_probe_reads_the_recycled_layers_without_changing_the_generation():
    from lab.attention_probe import ProbedLayout, SelectivityStats
    from model_patches.image_context import ImageContextPatch
    from train.anylogo_step import anylogo_forward

    model, data, layout, projection, x, sigma, subject_noise = micro_anylogo_inputs()
    stats = SelectivityStats()
    with torch.no_grad():
        outs = [anylogo_forward(model, lay, x, sigma, data.concat, data.subject, subject_noise,
                                ImageContextPatch(projection, data.tokens, layout.group_of))
                for lay in (layout, ProbedLayout(layout, stats, data.concat[:, :1]))]
    assert torch.equal(outs[0], outs[1])
    assert sorted(stats.per_layer()) == ["output0.0", "output1.0", "output2.0", "output3.0"]
    assert 0 < stats.overall()["region_share"] < 1 and stats.overall()["key_ratio"] == pytest.approx(0.2)


def test_pretraining_inputs_hide_show_or_blank_the_region_per_row():
    from lab import anylogo_data
    from lab.pretraining import pretrain_step_inputs

    data = anylogo_data.build(S.make_pairs(3, S.TRAIN_SUBJECTS, 3, seed=5), build_micro_image_encoder(seed=0))
    concat = pretrain_step_inputs(data.z0, data.concat, torch.tensor([0, 1, 2]))
    assert torch.equal(concat[0], data.concat[0])                                        # the region hidden
    assert torch.equal(concat[1, 0], torch.zeros(8, 8)) and torch.equal(concat[1, 1:], data.z0[1])  # all known
    assert torch.equal(concat[2, 0], torch.ones(8, 8)) and torch.equal(concat[2, 1:], torch.zeros(4, 8, 8))

def test_textured_subjects_keep_the_glyph_shape_and_add_a_texture_on_its_foreground():
    for i in (0, 7, S.HELD_OUT_SUBJECTS[3]):
        glyph, textured = S.subject(i), S.textured_subject(i)
        assert torch.equal(textured, S.textured_subject(i)) and textured.abs().max() <= 1
        changed = textured != glyph
        levels = glyph.unique()
        assert len(levels) == 2  # a glyph is two levels; the texture moves one of them only
        assert any(not (changed & (glyph == level)).any() for level in levels)
        assert changed.any() and (textured - glyph).abs().max() <= 0.3 + 1e-6
    scene = S.place(torch.zeros(1, 16, 16), S.textured_subject(1), 4, 6)
    assert torch.equal(scene[:, 4:12, 6:14], S.textured_subject(1)) and scene[:, :4].abs().max() == 0
    mask = S.box_mask((16, 16), 4, 6)
    assert mask.shape == (1, 16, 16) and mask.sum() == 64 and mask[0, 4:12, 6:14].min() == 1


def test_the_micro_text_encoder_is_comfyuis_clip_and_takes_a_learned_vector_at_the_placeholder():
    import comfy.sd

    from model_patches import eqdiff_tokens as fdte
    from lab.micro_models import build_micro_text_encoder

    clip = build_micro_text_encoder(seed=0)
    assert isinstance(clip, comfy.sd.CLIP)
    plain = clip.encode_from_tokens(clip.tokenize("a photo of sks toy"))
    assert plain.shape == (1, 77, 64) and torch.isfinite(plain).all()
    again = build_micro_text_encoder(seed=0).encode_from_tokens(clip.tokenize("a photo of sks toy"))
    assert torch.equal(plain, again)  # seeded
    (position,) = fdte.placeholder_positions(clip, "a photo of sks toy", "sks")
    vector = torch.randn(64, requires_grad=True)
    with_vector = fdte.encode_with_vector(clip, "a photo of sks toy", "sks", vector)
    # causal text attention: the positions before the placeholder are unchanged, from it on they change
    assert torch.allclose(with_vector[0, :position], plain[0, :position], atol=1e-5)
    assert not torch.allclose(with_vector[0, position], plain[0, position], atol=1e-3)
    (with_vector * torch.randn_like(with_vector)).sum().backward()
    assert vector.grad.abs().sum() > 0  # the gradient reaches the vector (textual inversion can train)


def test_the_convolutions_reach_is_measured_exactly_on_both_micro_unet_shapes():
    from lab.receptive_field import convolution_reach

    # one level: input conv 3, each res block's two 3x3 convs add 2 + 2, the final output conv 2 more
    flat, _ = build_micro_model(seed=0, shape="one-level")
    assert flat.diffusion_model.middle_block is None
    assert convolution_reach(flat, 24) == {"input1.0": 7, "output0.0": 11, "output1.0": 15, "output": 17}
    # two levels: after the stride-2 downsample every conv adds 2 x 2; the decoder sees all of a 20-cell input
    deep, _ = build_micro_model(seed=0)
    reach = convolution_reach(deep, 20)
    assert reach["input1.0"] == 7 and reach["input3.0"] == 17
    assert all(reach[name] == 20 for name in ("output0.0", "output1.0", "output2.0", "output3.0", "output"))
    with pytest.raises(ValueError, match="one of"):
        build_micro_model(shape="three-level")


def test_the_one_level_unet_runs_the_packs_recycling_at_its_two_decoder_layers():
    from lab import anylogo_data
    from lab.micro_models import MICRO_DINOV2
    from model_patches.image_context import ImageContextPatch, ImageProjection
    from train.anylogo_step import RecyclingLayout, anylogo_forward

    model, _ = build_micro_model(seed=2, shape="one-level")
    data = anylogo_data.build(S.make_pairs(2, S.HELD_OUT_SUBJECTS, 2, seed=2), build_micro_image_encoder(seed=0))
    layout = RecyclingLayout.of(model, "decoder", False, len(data.tokens))
    assert [s.name for s in layout.slots] == ["output0.0", "output1.0"]
    projection = ImageProjection(MICRO_DINOV2["hidden_size"], layout.context_dim)
    sigma = model.model_sampling.sigmas[[500, 800]].float()
    g = torch.Generator().manual_seed(4)
    x = data.z0 + torch.randn(data.z0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    noise = torch.randn(data.subject.shape, generator=g)
    with torch.no_grad():
        read, blocked = (anylogo_forward(model, layout, x, sigma, data.concat, data.subject, noise,
                                         ImageContextPatch(projection, data.tokens, layout.group_of), keep)
                         for keep in (None, torch.zeros(2, 2, dtype=torch.bool)))
    assert read.shape == data.z0.shape and not torch.allclose(read, blocked)


def test_upscaled_pairs_are_the_same_images_on_a_finer_latent_grid_with_the_same_tokens():
    from lab import anylogo_data

    pairs = S.make_pairs(2, S.HELD_OUT_SUBJECTS, 2, seed=2)
    encoder = build_micro_image_encoder(seed=0)
    plain, fine = anylogo_data.build(pairs, encoder), anylogo_data.build(pairs, encoder, scale=2)
    assert fine.z0.shape == (2, 4, 16, 16) and fine.concat.shape == (2, 5, 16, 16) and fine.subject.shape == (2, 4, 8, 8)
    assert torch.equal(S.depth_to_space(fine.z0), anylogo_data.upscaled(S.depth_to_space(plain.z0), 2))
    assert torch.equal(S.depth_to_space(fine.subject[0]), anylogo_data.upscaled(S.subject(pairs[0].subject_id), 2))
    assert torch.equal(fine.concat[:, :1], plain.concat[:, :1].repeat_interleave(2, -2).repeat_interleave(2, -1))
    assert all(torch.equal(a, b) for a, b in zip(fine.tokens, plain.tokens))


def test_side_by_side_puts_the_known_subject_gap_cells_right_of_the_scene():
    from lab import anylogo_data
    from lab.anylogo_miniature import side_by_side

    data = anylogo_data.build(S.make_pairs(2, S.TRAIN_SUBJECTS, 2, seed=5), build_micro_image_encoder(seed=0))
    z0, concat = side_by_side(data.z0, data.concat, data.subject, gap=3)
    assert z0.shape == (2, 4, 8, 8 + 3 + 4) and concat.shape == (2, 5, 8, 15)
    assert torch.equal(z0[..., :8], data.z0) and torch.equal(z0[..., :4, 11:], data.subject)
    assert torch.equal(z0[..., 8:11], torch.zeros(2, 4, 8, 3)) and torch.equal(z0[..., 4:, 11:], torch.zeros(2, 4, 4, 4))
    assert torch.equal(concat[:, :1, :, 8:], torch.zeros(2, 1, 8, 7))       # the column is known
    assert torch.equal(concat[:, 1:, :, 8:], z0[..., 8:]) and torch.equal(concat[:, :, :, :8], data.concat)
    z_plain, _ = side_by_side(data.z0, data.concat, data.subject)
    assert z_plain.shape[-1] == 12 and torch.equal(z_plain[..., :4, 8:], data.subject)


def test_the_match_share_is_one_for_a_copying_query_and_uniform_for_a_blind_one():
    from lab.attention_probe import attention_statistics, corresponding_keys

    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, 1:3, 2:4] = True
    corresponding = corresponding_keys(region.flatten(1), (4, 4), (2, 2))
    expected = torch.full((4, 4), -1)
    expected[1:3, 2:4] = torch.tensor([[0, 1], [2, 3]])
    assert torch.equal(corresponding.view(4, 4), expected)
    k_sub = torch.eye(4).view(1, 4, 4) * 1.0
    k = torch.zeros(1, 16, 4)
    q = torch.zeros(1, 16, 4)
    q[0, corresponding[0] >= 0] = 50.0 * k_sub[0, corresponding[0][corresponding[0] >= 0]]  # each finds its own key
    copying = attention_statistics(q, k, k_sub, heads=1, region=region.flatten(1), corresponding=corresponding)
    assert copying["match_share"] > 0.999 and copying["match_uniform"] == pytest.approx(0.25)
    blind = attention_statistics(torch.zeros(1, 16, 4), k, k_sub, heads=1, region=region.flatten(1),
                                 corresponding=corresponding)
    assert blind["match_share"] == pytest.approx(0.25, abs=1e-6) and blind["key_ratio"] == pytest.approx(4 / 20)


def test_the_copy_probe_reads_stock_self_attention_without_changing_it():
    from lab import anylogo_data
    from lab.anylogo_miniature import copy_selectivity, side_by_side
    from lab.attention_probe import SelectivityStats, SideBySideProbe
    from model_patches.unet_layout import transformer_slots

    model, _ = build_micro_model(seed=3, shape="one-level")
    data = anylogo_data.build(S.make_pairs(2, S.HELD_OUT_SUBJECTS, 2, seed=2), build_micro_image_encoder(seed=0))
    z0, concat = side_by_side(data.z0, data.concat, data.subject, gap=2)
    source = torch.zeros(1, 1, 8, 14)
    source[..., :4, 10:] = 1
    sigma = model.model_sampling.sigmas[[500, 800]].float()
    x = z0 + torch.randn(z0.shape, generator=torch.Generator().manual_seed(1)) * sigma.view(-1, 1, 1, 1)
    context = torch.zeros(2, 1, 64)
    stats = SelectivityStats()
    probe = SideBySideProbe(stats, concat[:, :1], source)
    with torch.no_grad():
        plain = model.apply_model(x, sigma, c_concat=concat, c_crossattn=context)
        probed = model.apply_model(x, sigma, c_concat=concat, c_crossattn=context, transformer_options={
            "patches_replace": {"attn1": {s.key: probe for s in transformer_slots(model)}}})
    assert torch.allclose(probed, plain, atol=1e-5)  # the probe's attention is ComfyUI's own; kernels may differ
    layer = stats.per_layer()["output1.0"]
    assert layer["key_ratio"] == pytest.approx(16 / 112) and layer["match_uniform"] == pytest.approx(1 / 16)
    overall, per_layer = copy_selectivity(model, data, torch.arange(2), gap=2)
    assert sorted(per_layer) == ["input1.0", "output0.0", "output1.0"] and 0 < overall["match_share"] < 1


def test_the_linear_readout_finds_a_planted_position_code_and_not_a_missing_one():
    from lab.attention_probe import linear_readout_accuracy

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 16, (512,), generator=g)
    fit = torch.arange(512) < 256
    noise = torch.randn(512, 32, generator=g)
    planted = noise * 0.1
    planted[:, :16] += torch.nn.functional.one_hot(labels, 16)
    assert linear_readout_accuracy(planted, labels, 16, fit) == 1.0
    assert linear_readout_accuracy(noise, labels, 16, fit) < 0.2  # no code: about chance (1/16), seeded


def test_the_position_probe_reads_every_layer_of_the_side_by_side_pass():
    from lab import anylogo_data
    from lab.anylogo_miniature import position_codes

    model, _ = build_micro_model(seed=3, shape="one-level")
    data = anylogo_data.build(S.make_pairs(4, S.HELD_OUT_SUBJECTS, 4, seed=2), build_micro_image_encoder(seed=0))
    codes = position_codes(model, data, gap=2, timesteps=(800,))
    assert sorted(codes[800]) == ["input1.0", "output0.0", "output1.0"]
    assert all(0 <= v["query"] <= 1 and 0 <= v["key"] <= 1 and v["chance"] == 1 / 16 for v in codes[800].values())


def test_position_code_offsets_and_what_each_pass_gets():
    """The code of a cell's offset: on every subject cell's key in the extraction pass, on the region's queries
    in the generation pass, never on values; orthonormal codes of norm scale·sqrt(width)."""
    from lab.position_code import PositionCode, offsets_in_boxes, orthonormal_codes
    from model_patches.recycling import STATUS_KEY, Extraction, Generation, SignatureBank

    codes = orthonormal_codes(16, 32, seed=3)
    torch.testing.assert_close(codes @ codes.T, torch.eye(16), rtol=0, atol=1e-5)
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:6, 4:8] = 1
    mask[1, 0:4, 0:4] = 1
    inside, index, bh, bw = offsets_in_boxes(mask)
    assert (bh, bw) == (4, 4) and int(index[0, 3, 6]) == 1 * 4 + 2 and int(index[1, 3, 0]) == 12
    assert bool(inside[0, 2, 4]) and not bool(inside[0, 1, 4]) and int(index[0, 0, 0]) == 0
    with pytest.raises(ValueError, match="different sizes"):
        offsets_in_boxes(torch.stack([mask[0], torch.nn.functional.pad(torch.ones(2, 2), (0, 6, 0, 6))]))

    here = {"block": ("output", 3), "block_index": 0}
    code = PositionCode(scale=0.5, slot_keys=[("output", 3, 0)], seed=1)
    n = torch.randn(2, 64, 32)
    # extraction: a 4x4 subject latent at this level holds 16 cells, each its own offset
    sub = torch.randn(2, 16, 32)
    q, k, v = code(sub, sub, sub, {**here, "activations_shape": [2, 32, 4, 4], "original_shape": [2, 4, 4, 4],
                                    STATUS_KEY: Extraction(SignatureBank(), ())})
    assert q is sub and v is sub
    assert torch.equal(k, sub + code.codes(16, 32, "cpu", torch.float32))
    assert float((k - sub)[0].norm(dim=-1).mean()) == pytest.approx(0.5 * math.sqrt(32), rel=1e-5)
    # generation: only the region's queries are coded, each with its offset's code
    code.region = mask[:, None]
    q, k, v = code(n, n, n, {**here, "activations_shape": [2, 32, 8, 8], "original_shape": [2, 4, 8, 8],
                                STATUS_KEY: Generation(SignatureBank(), reading_cond=0)})
    assert k is n and v is n
    grid, plain = q.view(2, 8, 8, 32), n.view(2, 8, 8, 32)
    table = code.codes(16, 32, "cpu", torch.float32)
    assert torch.equal(grid[0, 3, 6], plain[0, 3, 6] + table[6])
    assert torch.equal(grid[1, 3, 0], plain[1, 3, 0] + table[12])
    assert torch.equal(grid[~inside], plain[~inside])
    # a coarser layer's cell: the mean of the codes of the latent cells it covers, in both passes, so an
    # aligned region cell carries exactly the code of its subject cell and a cell on the region's edge a part
    coarse = {**here, "activations_shape": [2, 32, 4, 4], "original_shape": [2, 4, 8, 8]}
    q2, _, _ = code(torch.zeros(2, 16, 32), None, None, coarse)
    q2 = q2.view(2, 4, 4, 32)
    torch.testing.assert_close(q2[1, 1, 1], table[[10, 11, 14, 15]].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(q2[0, 1, 2], table[[0, 1, 4, 5]].mean(0), rtol=0, atol=1e-6)
    shifted = torch.zeros(2, 1, 8, 8)
    shifted[:, :, 1:5, 1:5] = 1  # off the coarse grid: the corner cell covers one region cell, offset (0, 0)
    code.region = shifted
    q3 = code(torch.zeros(2, 16, 32), None, None, coarse)[0].view(2, 4, 4, 32)
    torch.testing.assert_close(q3[0, 0, 0], table[0] / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(q3[0, 1, 1], table[[5, 6, 9, 10]].mean(0), rtol=0, atol=1e-6)
    _, k2, _ = code(torch.zeros(1, 4, 32), None, None, {**coarse, "activations_shape": [1, 32, 2, 2],
                                                        "original_shape": [1, 4, 4, 4],
                                                        STATUS_KEY: Extraction(SignatureBank(), ())})
    torch.testing.assert_close(k2[0, 3], table[[10, 11, 14, 15]].mean(0), rtol=0, atol=1e-6)
    # a layer that is not recycled is left alone
    other = {"block": ("input", 1), "block_index": 0, "activations_shape": [2, 32, 8, 8],
             "original_shape": [2, 4, 8, 8]}
    assert code(n, n, n, other)[0] is n


def test_the_coded_layout_runs_the_packs_recycling_and_banks_coded_keys():
    """On the micro UNet through the pack's anylogo_forward: scale 0 is the uncoded model exactly; with a code
    the first recycled layer's banked subject keys differ from the uncoded ones by W_k·code and its values not at
    all (the code reaches that layer's key projection in the extraction pass and the bank holds it), and the
    output changes."""
    from lab.position_code import CodedLayout, PositionCode
    from model_patches.anylogo import extract_signatures
    from model_patches.image_context import ImageContextPatch
    from train.anylogo_step import anylogo_forward

    model, data, layout, projection, x, sigma, subject_noise = micro_anylogo_inputs()
    context = ImageContextPatch(projection, data.tokens, layout.group_of)
    outs = []
    with torch.no_grad():
        for scale in (None, 0.0, 1.0):
            lay = layout if scale is None else CodedLayout(layout, scale)
            if scale is not None:
                lay.set_region(data.concat[:, :1])
            outs.append(anylogo_forward(model, lay, x, sigma, data.concat, data.subject, subject_noise, context))
        assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
        slot = layout.slots[0]
        zero_ctx = torch.zeros(2, 1, layout.context_dim)
        banks = []
        for lay in (layout, CodedLayout(layout, 1.0)):
            options = lay.transformer_options(context, True)
            banks.append(extract_signatures(model, data.subject, subject_noise, sigma, zero_ctx, [slot], options,
                                            in_channels=layout.in_channels))
    k_plain, k_coded = (b.keys[slot.key] for b in banks)
    v_plain, v_coded = (b.values[slot.key] for b in banks)
    assert slot.block == "output"
    attn1 = model.diffusion_model.output_blocks[slot.block_id][1].transformer_blocks[slot.block_index].attn1
    assert torch.equal(v_plain, v_coded)  # values are never coded
    side = data.subject.shape[-1]  # the 4x4 subject latent: 16 offsets, pooled to the layer's grid
    width = attn1.to_k.in_features
    table = PositionCode(1.0, [slot.key]).codes(side * side, width, "cpu", torch.float32)
    factor = side // int(math.isqrt(k_plain.shape[1]))
    assert factor == 2 ** slot.level
    grid = torch.nn.functional.avg_pool2d(table.T.reshape(1, width, side, side), factor).flatten(2)[0].T
    with torch.no_grad():
        coded_part = attn1.to_k(grid)
    torch.testing.assert_close(k_coded - k_plain, coded_part.expand_as(k_plain), rtol=1e-4, atol=1e-5)
