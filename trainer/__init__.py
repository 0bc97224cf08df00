"""The trainer's parts that are not the loop: config and CLI, rollouts, checkpoints, metrics, eval, distributed.

`OpenVLA_GRPO.py` holds the GRPO loop itself and is the only module that knows libero_env, vla_actor and grpo
together; these modules keep that loop short.
"""
