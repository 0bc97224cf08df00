"""LoRA adapters with non-zero weights, as after some training (a fresh adapter's B is zero and changes nothing)."""

import torch

from vla_actor import LoraSettings, VLAPolicy


def apply_trained_adapter(policy: VLAPolicy, settings: LoraSettings = LoraSettings(rank=4, alpha=8),
                          seed: int = 0) -> VLAPolicy:
    """Applies LoRA and fills every lora_B with 0.3 x standard normal values drawn from `seed`."""
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator: fix it so greedy near-ties cannot flip
    policy.apply_lora(settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy
