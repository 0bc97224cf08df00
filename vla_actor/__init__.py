"""vla_actor: OpenVLA-7B / OpenVLA-OFT policies on timm + transformers' Llama + PEFT, loading the released files.

The only package that knows the model; it knows nothing of the simulator.
"""

import logging

# PEFT imports torchao (the quantized bases, vla_actor/quant.py) when it is installed, and torchao 0.18 registers
# two Enums as pytree constants, which torch 2.14 deprecates with a warning line in every process (each env worker
# too); the registration still works, so only that logger's warnings are hidden, before PEFT is imported.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from vla_actor.action_tokens import ACTION_TOKEN_BEGIN, ACTION_TOKEN_END, ActionStats
from vla_actor.openvla_7b import build_openvla_7b, random_7b_policy
from vla_actor.policy import LoraSettings, SampleOutput, VLAPolicy, load_policy, resolve_dtype
from vla_actor.tiny import make_tiny_checkpoint

__all__ = ["ACTION_TOKEN_BEGIN", "ACTION_TOKEN_END", "ActionStats", "LoraSettings", "SampleOutput", "VLAPolicy",
           "build_openvla_7b", "load_policy", "make_tiny_checkpoint", "random_7b_policy", "resolve_dtype"]
