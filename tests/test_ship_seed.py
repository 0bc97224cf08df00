"""scripts/ship_seed.py: a seed's two ends become the assets, the adapter in bfloat16, and bad inputs change nothing."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from trained_adapters import apply_trained_adapter

from scripts.ship_seed import Ship, ship
from vla_actor import load_policy
from vla_actor.policy import ADAPTER_WEIGHTS_FILE


def seed_work_dir(checkpoint, root):
    """A seed's work directory as libero_learning leaves it: sft_export/ and two GRPO adapter exports."""
    shutil.copytree(checkpoint, root / "sft_export")
    for iteration, seed in ((5, 1), (15, 2)):
        apply_trained_adapter(load_policy(checkpoint), seed=seed).save_adapter(root / f"grpo{iteration}_export")
    return root


def test_ships_the_sft_export_and_the_last_adapter_in_bfloat16(checkpoint, tmp_path):
    work = seed_work_dir(checkpoint, tmp_path / "ll_seed3")
    assets = tmp_path / "assets"
    (assets / "old-sft").mkdir(parents=True)
    (assets / "old-sft" / "stale.json").write_text("{}")
    shipped = ship(Ship(work, sft_dest=assets / "old-sft", adapter_dest=assets / "grpo-lora"))
    assert shipped["adapter"].endswith("grpo15_export") and 0 < shipped["adapter_largest_relative_rounding"] < 4e-3
    assert sorted(path.name for path in (assets / "old-sft").iterdir()) == sorted(
        path.name for path in (work / "sft_export").iterdir())  # replaced whole, the stale file gone
    trained = load_file(work / "grpo15_export" / ADAPTER_WEIGHTS_FILE)
    stored = load_file(assets / "grpo-lora" / ADAPTER_WEIGHTS_FILE)
    assert stored.keys() == trained.keys() and all(tensor.dtype == torch.bfloat16 for tensor in stored.values())
    assert all(torch.equal(stored[name], trained[name].to(torch.bfloat16)) for name in trained)
    policy = load_policy(assets / "old-sft")
    policy.load_adapter(assets / "grpo-lora")
    assert any(parameter.abs().sum() > 0 for name, parameter in policy.model.named_parameters() if "lora_B" in name)


def test_a_work_dir_without_an_adapter_export_ships_nothing(checkpoint, tmp_path):
    work = tmp_path / "ll_seed4"
    shutil.copytree(checkpoint, work / "sft_export")
    with pytest.raises(FileNotFoundError, match="holds no GRPO adapter export"):
        ship(Ship(work, sft_dest=tmp_path / "sft", adapter_dest=tmp_path / "lora"))
    with pytest.raises(FileNotFoundError, match="holds no exported model"):
        ship(Ship(tmp_path / "missing", sft_dest=tmp_path / "sft", adapter_dest=tmp_path / "lora"))
    assert not (tmp_path / "sft").exists() and not (tmp_path / "lora").exists()
