"""Visual-token dropout for training (llavakit/training/token_drop.py)."""

import pytest
import torch

from llavakit.errors import InputError
from llavakit.training.config import TrainConfig
from llavakit.training.packing import block_mask
from llavakit.training.token_drop import drop_visual_tokens, step_generator


def _batch(b=3, prefix=2, n_img=20, text=6):
    t = prefix + n_img + text
    image = torch.zeros(b, t, dtype=torch.bool)
    image[:, prefix:prefix + n_img] = True
    blocks = torch.zeros(b, t, dtype=torch.long)
    blocks[:, prefix + n_img:] = 1
    valid = torch.ones(b, t, dtype=torch.bool)
    return block_mask(blocks, valid), image


def test_hidden_tokens_are_keys_for_no_other_query():
    mask, image = _batch()
    before = mask.clone()
    out = drop_visual_tokens(mask, image, 1.0, (0.25, 0.25), step_generator(0, 3, 0, 0))
    assert torch.equal(mask, before)  # the input mask is not modified
    last = out[:, 0, -1]  # (B, T): what the last text token sees
    for i in range(3):
        seen = last[i, image[i]]
        assert int(seen.sum()) == 5  # 25 % of 20 image tokens stay visible
        hidden = image[i].nonzero().flatten()[~seen]
        # no query but the token itself sees a hidden token, and it still sees itself
        cols = out[i, 0][:, hidden]
        assert int(cols.sum()) == hidden.numel()
        assert bool(out[i, 0, hidden, hidden].all())
        # text and prefix keys are untouched
        assert torch.equal(out[i, 0][:, ~image[i]], mask[i, 0][:, ~image[i]])


def test_probability_zero_changes_nothing_and_draw_is_deterministic():
    mask, image = _batch()
    assert torch.equal(drop_visual_tokens(mask, image, 0.0, (0.05, 0.5), step_generator(1, 2, 0, 0)), mask)
    a = drop_visual_tokens(mask, image, 0.5, (0.05, 0.5), step_generator(1, 2, 0, 0))
    b = drop_visual_tokens(mask, image, 0.5, (0.05, 0.5), step_generator(1, 2, 0, 0))
    c = drop_visual_tokens(mask, image, 0.5, (0.05, 0.5), step_generator(1, 3, 0, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_at_least_one_token_stays_visible():
    mask, image = _batch(b=8)
    out = drop_visual_tokens(mask, image, 1.0, (0.01, 0.01), step_generator(0, 0, 0, 0))
    assert (out[:, 0, -1][image].view(8, -1).sum(1) == 1).all()


def test_scores_keep_the_top_tokens_and_are_asked_only_for_dropped_rows():
    mask, image = _batch(b=6)
    scores = torch.rand(6, 20, generator=torch.Generator().manual_seed(3))  # (B, N)
    out = drop_visual_tokens(mask, image, 0.5, (0.2, 0.4), step_generator(2, 5, 0, 0), scores)
    dropped = []
    for i in range(6):
        seen = out[i, 0, -1][image[i]]  # (N,) what the last text token sees
        if bool(seen.all()):
            continue
        dropped.append(i)
        k = int(seen.sum())
        assert 4 <= k <= 8  # 20-40 % of 20 tokens
        assert set(seen.nonzero().flatten().tolist()) == set(scores[i].topk(k).indices.tolist())
    assert 0 < len(dropped) < 6  # this draw drops some rows and not others
    asked = []

    def lazy(rows):
        asked.append(list(rows))
        return scores[rows]

    lazy_out = drop_visual_tokens(mask, image, 0.5, (0.2, 0.4), step_generator(2, 5, 0, 0), lazy)
    assert torch.equal(lazy_out, out)  # same draws, same mask
    assert asked == [dropped]  # one call, only the dropped rows
    none = drop_visual_tokens(mask, image, 0.0, (0.2, 0.4), step_generator(2, 5, 0, 0), lazy)
    assert torch.equal(none, mask) and asked == [dropped]  # nothing dropped: never called


@pytest.mark.parametrize("kw,needle", [({"visual_token_drop": 1.5}, "visual_token_drop"),
                                        ({"visual_token_keep": [0.5, 0.2]}, "visual_token_keep"),
                                        ({"visual_token_keep": [0, 0.2]}, "visual_token_keep"),
                                        ({"visual_token_keep": 0.3}, "visual_token_keep")])
def test_config_refuses_bad_drop_settings(kw, needle):
    raw = {"data": [{"kind": "world-qa", "n": 2}], **kw}
    with pytest.raises(InputError, match=needle):
        TrainConfig.from_dict(raw)


def test_config_reads_drop_settings():
    cfg = TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2}], "visual_token_drop": 0.5,
                                 "visual_token_keep": [0.1, 0.4]})
    assert cfg.visual_token_drop == 0.5 and cfg.visual_token_keep == (0.1, 0.4)


def test_per_sequence_chances_hide_only_where_asked_with_the_same_draws():
    mask, image = _batch(b=4)
    gen = lambda: step_generator(4, 1, 0, 0)  # noqa: E731
    one = drop_visual_tokens(mask, image, 1.0, (0.2, 0.2), gen())
    same = drop_visual_tokens(mask, image, [1.0] * 4, (0.2, 0.2), gen())
    assert torch.equal(one, same)  # a list of equal chances is the scalar
    some = drop_visual_tokens(mask, image, [1.0, 0.0, 1.0, 0.0], (0.2, 0.2), gen())
    seen = some[:, 0, -1][image].view(4, -1).sum(1)  # (B,) image tokens the last text token sees
    assert seen.tolist() == [4, 20, 4, 20]
    assert torch.equal(some[1], mask[1]) and torch.equal(some[3], mask[3])
    assert torch.equal(some[0], one[0])  # a row's draw comes before the next row's, whatever the chances
    with pytest.raises(ValueError, match="3 visual token drop probabilities for 4 sequences"):
        drop_visual_tokens(mask, image, [1.0, 0.0, 1.0], (0.2, 0.2), gen())
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        drop_visual_tokens(mask, image, [1.0, 0.0, 1.5, 0.0], (0.2, 0.2), gen())


def test_a_data_source_sets_its_own_drop_chance():
    cfg = TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2},
                                          {"kind": "easyvqa", "n": 2, "visual_token_drop": 0.0}],
                                 "visual_token_drop": 0.4})
    assert [cfg.token_drop(s) for s in cfg.data] == [0.4, 0.0] and cfg.token_drop_on
    only = TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2, "visual_token_drop": 0.5}]})
    assert only.visual_token_drop == 0.0 and only.token_drop(only.data[0]) == 0.5 and only.token_drop_on
    off = TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2, "visual_token_drop": 0.0}],
                                 "visual_token_drop": 0.0})
    assert not off.token_drop_on
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(InputError, match="data source world-qa: visual_token_drop must be a probability"):
            TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2, "visual_token_drop": bad}]})
    with pytest.raises(InputError, match="cannot train together"):
        TrainConfig.from_dict({"data": [{"kind": "world-qa", "n": 2, "visual_token_drop": 0.5}],
                               "stage": "instruct", "yopo": "yopo:window=3"})
