"""Run infrastructure, not loops: config and CLI, the policy builder, rollouts, SFT's demo batches, checkpoints,
metrics, eval, distributed.

`OpenVLA_GRPO.py` holds the GRPO loop itself and is the only module that knows libero_env, vla_actor and grpo
together; `sft.py` holds the SFT loop. Both share these modules, which keep the loops short.
"""
