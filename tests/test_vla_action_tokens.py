"""Action tokenizer and un-normalisation against the hand-computed values of REF 4 and 5.1."""

import numpy as np
import pytest

from vla_actor.action_tokens import (BIN_CENTERS, ActionStats, detokenize, find_stats, tokenize_normalized)


def test_hand_values():
    # a=-1 -> d=1 -> 31999; a=0 -> d=128 -> 31872; a=0.5 -> d=192 -> 31808; a=1 -> d=256 -> 31744 (REF 4)
    ids = tokenize_normalized(np.array([-1.0, 0.0, 0.5, 1.0]))
    assert ids.tolist() == [31999, 31872, 31808, 31744]
    values = detokenize(ids)
    # centre k = -1 + (2k + 1) / 255; id 31808 -> k = 191 -> 0.501960..., id 31999 -> k = 0, id 31744 -> k = 254
    assert values[0] == pytest.approx(-1 + 1 / 255)
    assert values[1] == 0.0
    assert values[2] == pytest.approx(-1 + 383 / 255) and round(values[2], 5) == 0.50196
    assert values[3] == pytest.approx(1 - 1 / 255)


def test_bins_and_clipping():
    assert len(BIN_CENTERS) == 255 and BIN_CENTERS[127] == 0.0
    assert tokenize_normalized(np.array([-3.0, 7.0])).tolist() == [31999, 31744]
    # 31744 and 31745 share the top bin; anything outside the action range is clipped to a bin (REF 3.3)
    assert detokenize(np.array([31744, 31745])).tolist() == [BIN_CENTERS[254]] * 2
    assert detokenize(np.array([2, 32000])).tolist() == [BIN_CENTERS[254], BIN_CENTERS[0]]


def test_round_trip_on_bin_centres():
    ids = np.arange(31745, 32000)  # one id per centre
    assert tokenize_normalized(detokenize(ids)).tolist() == ids.tolist()


STATS = {"action": {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 2.0], "mask": [True, True, False]},
         "proprio": {"q01": [0.0, -2.0], "q99": [1.0, 2.0]}}


def test_unnormalize_hand_values():
    stats = ActionStats.from_dict(STATS, "k")
    normalized = np.array([0.5, -1.0, 0.25])
    # 0.5 (x + 1)(q99 - q01) + q01: 0.5*1.5*2 - 1 = 0.5; 0.5*0*4 + 0 = 0; masked dim passes through
    assert stats.unnormalize(normalized).tolist() == [0.5, 0.0, 0.25]
    oft = stats.unnormalize(normalized, eps=1e-8)
    assert oft[0] == pytest.approx(0.5 + 0.75e-8, abs=1e-12) and oft[2] == 0.25


def test_normalize_inverts_unnormalize():
    stats = ActionStats.from_dict(STATS, "k")
    normalized = np.array([[0.3, -0.7, 0.9], [-1.0, 1.0, 0.0]])
    assert np.allclose(stats.normalize(stats.unnormalize(normalized)), normalized, atol=1e-7)
    assert stats.normalize(np.array([5.0, -9.0, 3.0])).tolist() == [1.0, -1.0, 1.0]  # clipped to [-1, 1]


def test_proprio_normalisation_hand_values():
    stats = ActionStats.from_dict(STATS, "k")
    # 2 (p - q01) / (q99 - q01 + 1e-8) - 1, clipped
    assert np.allclose(stats.normalize_proprio(np.array([[0.25, 1.0], [3.0, -5.0]])), [[-0.5, 0.5], [1.0, -1.0]])
    with pytest.raises(ValueError, match="2 values per sample"):
        stats.normalize_proprio(np.zeros((1, 3)))


def test_mask_defaults_to_all_true():
    stats = ActionStats.from_dict({"action": {"q01": [0.0, 0.0], "q99": [2.0, 4.0]}}, "k")
    assert stats.unnormalize(np.array([0.0, 0.0])).tolist() == [1.0, 2.0]
    assert stats.proprio_q01 is None


def test_key_lookup_falls_back_to_no_noops():
    key, stats = find_stats({"libero_goal_no_noops": STATS}, "libero_goal", "file")
    assert key == "libero_goal_no_noops" and stats.action_dim == 3
    assert find_stats({"libero_goal": STATS, "libero_goal_no_noops": {}}, "libero_goal", "file")[0] == "libero_goal"
    with pytest.raises(ValueError, match=r"'bridge' \(nor 'bridge_no_noops'\) is not in file.*libero_goal"):
        find_stats({"libero_goal": STATS}, "bridge", "file")


def test_bad_statistics():
    with pytest.raises(ValueError, match="need action.q01 and action.q99"):
        ActionStats.from_dict({"action": {"q01": [0.0]}}, "k")
    with pytest.raises(ValueError, match="equal length"):
        ActionStats.from_dict({"action": {"q01": [0.0], "q99": [1.0, 2.0]}}, "k")
