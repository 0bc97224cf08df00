"""Action tokens <-> continuous actions (REF 4 and 5.1), and the dataset statistics that scale them.

OpenVLA discretises each normalised action dimension into 256 bins and writes bin d as the Llama token
32000 - d, i.e. ids 31744..31999, the last 256 pieces of the Llama vocabulary. Decoding maps a token to the
centre of its bin (255 centres) and un-normalises with the q01/q99 bounds of the training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LLAMA_VOCAB_SIZE = 32000  # Llama-2 pieces, excluding <PAD>; the model's "vocab_size" for de-tokenisation
N_BINS = 256
ACTION_TOKEN_BEGIN = LLAMA_VOCAB_SIZE - N_BINS  # 31744, the first of the 256 action token ids
ACTION_TOKEN_END = LLAMA_VOCAB_SIZE  # exclusive
ACTION_DIM = 7
OFT_CHUNK = 8  # NUM_ACTIONS_CHUNK for LIBERO (REF 6.1)
BINS = np.linspace(-1.0, 1.0, N_BINS)
BIN_CENTERS = (BINS[:-1] + BINS[1:]) / 2.0  # 255 centres, BIN_CENTERS[127] == 0.0


def tokenize_normalized(normalized: np.ndarray) -> np.ndarray:
    """Normalised actions in [-1, 1] (clipped) -> action token ids in [31744, 31999] (int64, same shape)."""
    bin_index = np.digitize(np.clip(normalized, -1.0, 1.0), BINS)  # in [1, 256]
    return (LLAMA_VOCAB_SIZE - bin_index).astype(np.int64)


def detokenize(token_ids: np.ndarray) -> np.ndarray:
    """Action token ids -> normalised bin-centre values (float64). Ids 31744 and 31745 share the top bin."""
    index = np.clip(LLAMA_VOCAB_SIZE - np.asarray(token_ids, dtype=np.int64) - 1, 0, N_BINS - 2)
    return BIN_CENTERS[index]


@dataclass(frozen=True)
class ActionStats:
    """BOUNDS_Q99 statistics of one dataset key (REF 1.3)."""

    q01: np.ndarray
    """Lower bound per action dimension, float64 [action_dim]."""
    q99: np.ndarray
    """Upper bound per action dimension, float64 [action_dim]."""
    mask: np.ndarray
    """Which dimensions are (un-)normalised; False for the LIBERO gripper. bool [action_dim]."""
    proprio_q01: np.ndarray | None
    """Lower bound of the proprio state (OFT), None when the statistics have none."""
    proprio_q99: np.ndarray | None
    """Upper bound of the proprio state (OFT)."""
    proprio_mask: np.ndarray | None
    """Which proprio dimensions are normalised (all True when the file has no mask)."""

    @staticmethod
    def from_dict(stats: dict, key: str) -> ActionStats:
        """Parse `{"action": {q01, q99, mask?}, "proprio": {...}?}`; raises ValueError naming what is missing."""
        action = stats.get("action")
        if not isinstance(action, dict) or "q01" not in action or "q99" not in action:
            raise ValueError(f"dataset statistics {key!r} need action.q01 and action.q99 (REF 1.3); got keys "
                             f"{sorted(action) if isinstance(action, dict) else sorted(stats)}")
        q01 = np.asarray(action["q01"], dtype=np.float64)
        q99 = np.asarray(action["q99"], dtype=np.float64)
        mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if not (q01.shape == q99.shape == mask.shape) or q01.ndim != 1:
            raise ValueError(f"dataset statistics {key!r}: action q01 {q01.shape}, q99 {q99.shape} and mask "
                             f"{mask.shape} must be 1-D of equal length")
        proprio = stats.get("proprio")
        has_proprio = isinstance(proprio, dict) and "q01" in proprio and "q99" in proprio
        proprio_q01 = np.asarray(proprio["q01"], dtype=np.float64) if has_proprio else None
        proprio_q99 = np.asarray(proprio["q99"], dtype=np.float64) if has_proprio else None
        proprio_mask = (np.asarray(proprio.get("mask", np.ones_like(proprio_q01, dtype=bool)), dtype=bool)
                        if has_proprio else None)
        return ActionStats(q01, q99, mask, proprio_q01, proprio_q99, proprio_mask)

    @property
    def action_dim(self) -> int:
        return len(self.q01)

    def unnormalize(self, normalized: np.ndarray, eps: float = 0.0) -> np.ndarray:
        """[-1, 1] -> dataset units on masked dims; OpenVLA uses eps=0, OFT adds eps=1e-8 to the range (REF 5.1)."""
        actions = 0.5 * (normalized + 1.0) * (self.q99 - self.q01 + eps) + self.q01
        return np.where(self.mask, actions, normalized)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Dataset units -> [-1, 1] on masked dims (training-side BOUNDS_Q99), clipped to [-1, 1]."""
        normalized = 2.0 * (actions - self.q01) / (self.q99 - self.q01 + 1e-8) - 1.0
        return np.clip(np.where(self.mask, normalized, actions), -1.0, 1.0)

    def normalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """OFT `normalize_proprio`: clip(where(mask, 2(p - q01)/(q99 - q01 + 1e-8) - 1, p), -1, 1)."""
        if self.proprio_q01 is None:
            raise ValueError("these dataset statistics have no proprio q01/q99, so proprio cannot be normalised")
        if proprio.shape[-1] != len(self.proprio_q01):
            raise ValueError(f"proprio must have {len(self.proprio_q01)} values per sample (the statistics' "
                             f"length), got shape {tuple(proprio.shape)}")
        normalized = 2.0 * (proprio - self.proprio_q01) / (self.proprio_q99 - self.proprio_q01 + 1e-8) - 1.0
        return np.clip(np.where(self.proprio_mask, normalized, proprio), -1.0, 1.0)


def find_stats(norm_stats: dict, unnorm_key: str, source: str) -> tuple[str, ActionStats]:
    """Look up `unnorm_key`, then `unnorm_key + "_no_noops"` (REF 1.1); returns the key found and its stats."""
    for key in (unnorm_key, f"{unnorm_key}_no_noops"):
        if key in norm_stats:
            return key, ActionStats.from_dict(norm_stats[key], key)
    raise ValueError(f"unnorm_key {unnorm_key!r} (nor {unnorm_key + '_no_noops'!r}) is not in {source}; "
                     f"available keys: {sorted(norm_stats)}")
