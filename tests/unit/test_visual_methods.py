"""H2 visual-token methods: HiRED (+ its multi-partition budget allocation) and the random / pool /
downsample baselines, on a tiny random LLaVA (CLIP tower, 32 px, 8 px patches: a 4x4 grid, 16 tokens,
3 layers, feature layer -2 = layer 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import llavakit
from llavakit import InputError
from llavakit.compression import Compression, StageContext, with_budget
from llavakit.visual.baselines import Downsample, RandomKeep, SpatialPool
from llavakit.visual.hired import allocate_budget, select_partitions, tile_regions

SPECS = ["hired", "hired:rho=0.5", "hired:rho=0.5:late_layer=0", "random:keep=0.5", "random:count=5:seed=3",
         "pool:keep=0.25", "pool:count=1", "downsample:keep=0.25", "downsample:count=9"]


@pytest.fixture(scope="module")
def llava_dir(tiny_llava_dir):
    return tiny_llava_dir


@pytest.fixture(scope="module")
def vlm(llava_dir, one_torch_thread):
    return llavakit.load(str(llava_dir))


@pytest.fixture(scope="module")
def hf_llava(llava_dir):
    """The same checkpoint in transformers, eager attention (returns attention probabilities)."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32,
                                                         attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (N, C, H, W)


def _comp(spec, model):
    comp = Compression.parse(spec)
    comp.check(model)
    return comp


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]


# ----------------------------------------------------------------------------- contract on the tiny model
@pytest.mark.parametrize("spec", SPECS)
def test_count_positions_determinism(vlm, pixels, spec):
    m = vlm.model
    comp = _comp(spec, m)
    out = comp.image_features(m, pixels)
    n = m.num_image_tokens((32, 32), compression=comp)
    rows, cols = out.grid
    for f, p in zip(out.features, out.positions):
        assert f.shape == (n, m.config.lm.hidden_size) and torch.isfinite(f).all()
        assert p.dtype == torch.long and p.shape == (n, 2)
        assert ((p[:, 0] >= 0) & (p[:, 0] < rows) & (p[:, 1] >= 0) & (p[:, 1] < cols)).all()
        flat = p[:, 0] * cols + p[:, 1]
        assert (flat[1:] > flat[:-1]).all()  # raster order, no repeats
    again = comp.image_features(m, pixels)
    assert all(torch.equal(a, b) for a, b in zip(out.features, again.features))
    assert all(torch.equal(a, b) for a, b in zip(out.positions, again.positions))
    # an image's tokens do not depend on the other images of its batch
    alone = comp.image_features(m, pixels[1:2])
    torch.testing.assert_close(alone.features[0], out.features[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(alone.positions[0], out.positions[1])


@pytest.mark.parametrize("spec", ["hired:rho=0.5", "random:keep=0.5", "pool:keep=0.25", "downsample:keep=0.25"])
def test_batched_chat_equals_single(vlm, spec):
    imgs = _images()
    prompts = ["what is in the image ?", "describe the red circle and the blue square"]
    batch = vlm.chat_batch(prompts, [[imgs[0]], [imgs[1]]], compression=spec, max_new_tokens=5)
    single = [vlm.chat(p, im, compression=spec, max_new_tokens=5) for p, im in zip(prompts, imgs)]
    assert batch == single


def test_token_counts(vlm):
    m = vlm.model
    counts = {s: m.num_image_tokens((32, 32), compression=_comp(s, m)) for s in SPECS}
    assert counts == {"hired": 3, "hired:rho=0.5": 8, "hired:rho=0.5:late_layer=0": 8, "random:keep=0.5": 8,
                      "random:count=5:seed=3": 5, "pool:keep=0.25": 4, "pool:count=1": 1,
                      "downsample:keep=0.25": 4, "downsample:count=9": 9}
    assert with_budget("hired:alpha=0.3", 0.1) == "hired:alpha=0.3:rho=0.1"
    assert with_budget("pool:count=4", 0.5) == "pool:keep=0.5"


# ----------------------------------------------------------------------------- HiRED single image
@pytest.mark.parametrize("rho, late", [(0.2, None), (0.5, None), (0.4, 0), (0.3, -1)])
def test_hired_matches_hand_computation(vlm, hf_llava, pixels, rho, late):
    """Top int(N*rho) by head-summed [CLS] attention of the late layer (default num_layers - 2), computed
    independently with transformers' eager CLIP attention."""
    n_layers = hf_llava.config.vision_config.num_hidden_layers  # 3
    layer = {None: n_layers - 2, -1: n_layers - 1}.get(late, late)
    with torch.no_grad():
        attn = hf_llava.model.vision_tower(pixels, output_attentions=True).attentions[layer]  # (N, H, 17, 17)
    score = attn[:, :, 0, 1:].sum(1)  # (N, 16)
    k = int(16 * rho)
    expect = torch.topk(score, k, dim=-1).indices.sort(-1).values  # (N, k)

    m = vlm.model
    spec = f"hired:rho={rho}" + ("" if late is None else f":late_layer={late}")
    out = _comp(spec, m).image_features(m, pixels)
    with torch.no_grad():
        feats = m._select(pixels)  # (N, 16, Dv)
    for i in range(pixels.shape[0]):
        flat = out.positions[i][:, 0] * 4 + out.positions[i][:, 1]
        assert flat.tolist() == expect[i].tolist()
        torch.testing.assert_close(out.features[i], m.multi_modal_projector(feats[i, expect[i]]), atol=1e-5, rtol=1e-5)


def test_hired_ours_selection_via_select_with_attention(vlm, pixels):
    m = vlm.model
    with torch.no_grad():
        _, attn = m._select_with_attention(pixels, {1: slice(0, 1)})
    score = attn[1][:, :, 0, 1:].sum(1)  # (N, 16): layer 1 = num_layers - 2
    out = _comp("hired:rho=0.25", m).image_features(m, pixels)
    for i in range(pixels.shape[0]):
        expect = sorted(torch.topk(score[i], 4).indices.tolist())
        assert (out.positions[i][:, 0] * 4 + out.positions[i][:, 1]).tolist() == expect


# ----------------------------------------------------------------------------- HiRED budget allocation
def _left_half_map() -> torch.Tensor:
    """4x4 early attention whose top 8 tokens are the left half (columns 0-1)."""
    a = torch.zeros(4, 4)
    a[:, :2] = 1.0 + torch.arange(8, dtype=torch.float).view(4, 2) / 100
    return a.flatten()  # (16,)


def test_tile_regions():
    assert tile_regions((4, 4), 2, 2) == [(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2), (2, 4, 2, 4)]
    assert tile_regions((5, 4), 2, 1) == [(0, 2, 0, 4), (2, 5, 0, 4)]
    with pytest.raises(InputError, match="cannot tile"):
        tile_regions((4, 4), 5, 1)


def test_budget_2d_regions_vs_rowmajor():
    """2x2 sub-images of a 4x4 map whose hits are the left half: in 2-D the left tiles get everything;
    the reference's row-major split (chunk i = grid row i here) spreads it evenly."""
    early = _left_half_map()
    quads = tile_regions((4, 4), 2, 2)
    # P=5, N=16, rho=0.5: total=40, full=min(20,16)=16, sub_total=min(24,64)=24; 8 hits (alpha=0.5)
    assert allocate_budget(early, (4, 4), quads, rho=0.5, alpha=0.5) == [16, 12, 0, 12, 0]
    assert allocate_budget(early, (4, 4), quads, rho=0.5, alpha=0.5, rowmajor=True) == [16, 6, 6, 6, 6]


def test_budget_formula_cases():
    early = _left_half_map()
    halves = tile_regions((4, 4), 1, 2)  # left, right
    # P=3, rho=1: total=48, full=16, sub_total=32; all 8 hits on the left -> 32, capped at N=16
    assert allocate_budget(early, (4, 4), halves, rho=1.0, alpha=0.5) == [16, 16, 0]
    # P=3, rho=0.2: total=int(9.6)=9, full=int(4.5)=4, sub_total=5 -> all to the left
    assert allocate_budget(early, (4, 4), halves, rho=0.2, alpha=0.5) == [4, 5, 0]
    # alpha=0.75: top int(16*0.25)=4 hits = the 4 largest (rows 2-3, left) ; P=5, rho=0.5: total=40,
    # full=min(30,16)=16, sub_total=24 -> all to the bottom-left tile
    assert allocate_budget(early, (4, 4), tile_regions((4, 4), 2, 2), rho=0.5, alpha=0.75) == [16, 0, 0, 16, 0]
    # alpha=0.25: top 12 hits = left half + the 4 lowest-index ties of the right half (row 0-1, cols 2-3)
    # P=5, rho=0.5: full=min(10,16)=10, sub_total=30 -> 4*30//12 = 10 each for three tiles
    assert allocate_budget(early, (4, 4), tile_regions((4, 4), 2, 2), rho=0.5, alpha=0.25) == [10, 10, 10, 10, 0]
    # alpha=0: no full-image tokens, every token is a hit: budgets follow the region areas (12 vs 4 tokens);
    # P=3, rho=0.25: total=12, full=0, sub_total=12 -> 12*12//16=9, 4*12//16=3
    assert allocate_budget(early, (4, 4), [(0, 3, 0, 4), (3, 4, 0, 4)], rho=0.25, alpha=0.0) == [0, 9, 3]
    # alpha=1: everything for the full image; no hit anywhere, so the sub-images get nothing
    assert allocate_budget(early, (4, 4), halves, rho=0.5, alpha=1.0) == [16, 0, 0]
    # one partition (no sub-image): full = int(int(N*rho)*alpha)
    assert allocate_budget(early, (4, 4), [], rho=0.5, alpha=0.5) == [4]


def test_budget_llava_next_shape():
    """LLaVA-NeXT-like: 24x24 grid, 2x2 sub-images, defaults rho=0.2, alpha=0.5 -> 576 tokens in all."""
    g = torch.Generator().manual_seed(0)
    early = torch.rand(576, generator=g)
    quads = tile_regions((24, 24), 2, 2)
    b = allocate_budget(early, (24, 24), quads, rho=0.2, alpha=0.5)
    assert b[0] == 288 and all(0 <= x <= 576 for x in b) and 288 - 4 < sum(b[1:]) <= 288
    hits = torch.zeros(576, dtype=torch.bool)
    hits[torch.topk(early, 288).indices] = True
    counts = [int(hits.view(24, 24)[r0:r1, c0:c1].sum()) for r0, r1, c0, c1 in quads]
    assert b[1:] == [int(c * 288 // sum(counts)) for c in counts]


def test_select_partitions():
    early = _left_half_map()
    quads = tile_regions((4, 4), 2, 2)
    late = torch.rand(5, 16, generator=torch.Generator().manual_seed(2))
    kept = select_partitions(early, late, (4, 4), quads, rho=0.5, alpha=0.5)
    assert [len(k) for k in kept] == [16, 12, 0, 12, 0]
    for i, k in enumerate(kept):
        assert k.tolist() == sorted(torch.topk(late[i], len(k)).indices.tolist())
    with pytest.raises(InputError, match="late attention"):
        select_partitions(early, late[:3], (4, 4), quads, rho=0.5, alpha=0.5)


def test_budget_bad_input():
    early = _left_half_map()
    with pytest.raises(InputError, match="does not match the 4x5 patch grid"):
        allocate_budget(early, (4, 5), [], rho=0.5, alpha=0.5)
    with pytest.raises(InputError, match=r"region \(0, 5, 0, 2\)"):
        allocate_budget(early, (4, 4), [(0, 5, 0, 2)], rho=0.5, alpha=0.5)
    with pytest.raises(InputError, match="alpha must be in"):
        allocate_budget(early, (4, 4), [(0, 2, 0, 2)], rho=0.5, alpha=1.5)
    with pytest.raises(InputError, match="rho must be a ratio"):
        allocate_budget(early, (4, 4), [(0, 2, 0, 2)], rho=0.0, alpha=0.5)


# ----------------------------------------------------------------------------- baselines
def test_random_is_a_function_of_seed_and_count():
    a, b = RandomKeep(keep=0.25), RandomKeep(keep=0.25, seed=1)
    assert a.indices(576).tolist() == RandomKeep(count=144).indices(576).tolist()
    assert len(a.indices(576)) == 144 and a.indices(576).tolist() != b.indices(576).tolist()
    idx = a.indices(576)
    assert (idx[1:] > idx[:-1]).all() and idx.max() < 576
    tokens = torch.randn(2, 16, 8)
    pos = torch.stack([torch.arange(16) // 4, torch.arange(16) % 4], -1)[None].expand(2, 16, 2)
    t, p = RandomKeep(keep=0.5)(tokens, pos, StageContext(grid=(4, 4)))
    assert torch.equal(p[0], p[1]) and torch.equal(t, tokens[:, RandomKeep(keep=0.5).indices(16)])


def _grid_pos(n, g):
    r = torch.arange(g * g)
    return torch.stack([r // g, r % g], -1)[None].expand(n, g * g, 2).contiguous()


def test_pool_constant_and_block_means():
    pool = SpatialPool(keep=0.25)
    const = torch.full((2, 16, 5), 3.25)
    t, p = pool(const, _grid_pos(2, 4), StageContext(grid=(4, 4)))
    assert t.shape == (2, 4, 5) and torch.allclose(t, torch.full_like(t, 3.25))
    assert p[0].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]  # centre patch of each 2x2 cell
    ramp = torch.arange(16, dtype=torch.float).view(1, 16, 1)
    t, _ = pool(ramp, _grid_pos(1, 4), StageContext(grid=(4, 4)))
    assert t.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 blocks
    # uneven bins (24 -> 5: adaptive pooling) still give a constant back
    t, p = SpatialPool(count=25)(torch.full((1, 576, 3), -1.5), _grid_pos(1, 24), StageContext(grid=(24, 24)))
    assert t.shape == (1, 25, 3) and torch.allclose(t, torch.full_like(t, -1.5))
    assert p[0, :5, 1].tolist() == [2, 6, 11, 16, 21]  # bins [0,5) [4,10) [9,15) [14,20) [19,24)


def test_pool_counts_and_refusals(vlm, pixels):
    assert [SpatialPool(keep=k).num_out(576) for k in (1.0, 0.25, 1 / 16, 1 / 64, 1 / 576)] == [576, 144, 36, 9, 1]
    assert SpatialPool(count=58).num_out(576) == 64  # round(sqrt(58)) = 8
    with pytest.raises(InputError, match="not a square number"):
        SpatialPool(keep=0.5).num_out(15)
    m = vlm.model
    with pytest.raises(InputError, match="full patch grid"):  # refused when checked, before any compute
        _comp("random:count=4,pool:keep=0.25", m)  # 4 tokens is a square count, but not the grid
    with pytest.raises(InputError, match="full patch grid"):
        _comp("random:count=5,pool:keep=0.5", m)


def test_downsample_view_sizes(vlm, pixels):
    assert Downsample(keep=0.25).view_size(336, 336, 14) == (168, 168)  # 576 -> 144 tokens
    assert Downsample(count=58).view_size(336, 336, 14) == (112, 112)  # round(sqrt(58)) = 8 patches
    assert Downsample(keep=0.25).view_size(336, 672, 14) == (168, 336)  # aspect kept: 12 x 24
    assert Downsample(count=1).view_size(336, 672, 14) == (14, 14)  # at least one patch a side
    m = vlm.model
    comp = _comp("downsample:keep=0.25", m)
    assert comp.view_size(m, (32, 32)) == (16, 16)
    out = comp.image_features(m, pixels)
    assert out.grid == (2, 2) and out.features[0].shape[0] == 4
    with pytest.raises(InputError, match="count=17 is above the 16"):
        _comp("downsample:count=17", m)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec, match", [
    ("hired:keep=0.2", "unknown parameter 'keep'; valid: rho, alpha, early_layer, late_layer, rowmajor"),
    ("hired:rho=0", "rho must be a ratio"),
    ("hired:rho=1.5", "rho must be a ratio"),
    ("hired:alpha=2", "alpha must be in"),
    ("hired:rowmajor=yes", "rowmajor must be true or false"),
    ("hired:late_layer=x", "late_layer must be an integer"),
    ("random", "give keep"),
    ("random:keep=0.5:count=3", "not both"),
    ("random:keep=0", "keep must be a ratio"),
    ("random:count=0", "count must be a positive integer"),
    ("random:seed=-1:keep=0.5", "seed must be a non-negative integer"),
    ("random:ratio=0.5", "unknown parameter 'ratio'; valid: keep, count, seed"),
    ("pool:keep=1.5", "keep must be a ratio"),
    ("pool:size=3", "unknown parameter 'size'; valid: keep, count"),
    ("downsample:count=0", "count must be a positive integer"),
    ("downsample:keep=-1", "keep must be a ratio"),
    ("fastv:layer=1:keep=0.5:pos=original", "pre-LLM token stages only"),
    ("downsample:keep=0.5:pos=original", "pre-LLM token stages only"),
    ("fastervlm:keep=0.5:pos=sideways", "pos must be one of compact, original"),
    ("[random:keep=0.5:pos=original, fastervlm:keep=0.5]", "disagree on pos"),
])
def test_bad_params_refused_at_parse(spec, match):
    with pytest.raises(InputError, match=match):
        Compression.parse(spec)


def test_counts_above_the_tokens_and_bad_layers(vlm, pixels):
    m = vlm.model
    for spec in ("random:count=17", "pool:count=17"):
        with pytest.raises(InputError, match="count=17 is above the 16 visual tokens"):
            _comp(spec, m)
    with pytest.raises(InputError, match="late_layer=3 is outside the tower's 3 layers"):  # at check time
        _comp("hired:late_layer=3", m)
