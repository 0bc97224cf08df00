"""The LIBERO layer: suites and their limits, the reference observation pipeline, the action conversion, and a
crash-tolerant vector env. The only package that knows the simulator, which it imports in worker processes only."""

from libero_env.processing import (
    center_crop,
    jpeg_round_trip,
    lanczos_resize,
    preprocess_image,
    proprio_vector,
    to_env_actions,
    upright,
)
from libero_env.suites import (
    NUM_INIT_STATES,
    NUM_WAIT_STEPS,
    SUITES,
    WAIT_ACTION,
    EpisodeSpec,
    Suite,
    get_suite,
    init_state_split,
    reference_episodes,
)
from libero_env.vector_env import LiberoVectorEnv, Observation, StepResult, write_video

__all__ = [
    "NUM_INIT_STATES",
    "NUM_WAIT_STEPS",
    "SUITES",
    "WAIT_ACTION",
    "EpisodeSpec",
    "LiberoVectorEnv",
    "Observation",
    "StepResult",
    "Suite",
    "center_crop",
    "get_suite",
    "init_state_split",
    "jpeg_round_trip",
    "lanczos_resize",
    "preprocess_image",
    "proprio_vector",
    "reference_episodes",
    "to_env_actions",
    "upright",
    "write_video",
]
