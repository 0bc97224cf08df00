"""vla_actor: OpenVLA-7B / OpenVLA-OFT policies on timm + transformers' Llama + PEFT, loading the released files.

The only package that knows the model; it knows nothing of the simulator.
"""

from vla_actor.action_tokens import ACTION_TOKEN_BEGIN, ACTION_TOKEN_END, ActionStats
from vla_actor.openvla_7b import build_openvla_7b, random_7b_policy
from vla_actor.policy import LoraSettings, SampleOutput, VLAPolicy, load_policy, resolve_dtype
from vla_actor.tiny import make_tiny_checkpoint

__all__ = ["ACTION_TOKEN_BEGIN", "ACTION_TOKEN_END", "ActionStats", "LoraSettings", "SampleOutput", "VLAPolicy",
           "build_openvla_7b", "load_policy", "make_tiny_checkpoint", "random_7b_policy", "resolve_dtype"]
