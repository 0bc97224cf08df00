"""A LIBERO demonstration file in the published layout (LIBERO's create_dataset.py), written with h5py here:

    data.attrs: problem_info (JSON: problem_name, domain_name, language_instruction), env_args (JSON: env_name,
                type, env_kwargs), bddl_file_name, macros_hash, num_demos, total
    data/demo_N: actions [T,7] (env convention: gripper -1 open, +1 close), states [T,D], robot_states [T,9],
                 rewards [T], dones [T]; attrs num_samples, init_state, model_file
    data/demo_N/obs: agentview_rgb, eye_in_hand_rgb [T,128,128,3], ee_pos, ee_ori, ee_states, gripper_states,
                     joint_states

Images and low-dimensional observations are zero placeholders: the replay reads only actions and states[0].
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def write_libero_hdf5(path: Path, instruction: str, bddl_file: str,
                      demos: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """`demos`: (env-convention actions [T,7], flattened MuJoCo states [T,D]) per demo, written as demo_0, ..."""
    problem_info = {"problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite",
                    "language_instruction": instruction}
    env_args = {"type": 1, "env_name": "Libero_Tabletop_Manipulation",
                "env_kwargs": {"bddl_file_name": bddl_file, "camera_heights": 128, "camera_widths": 128,
                               "camera_names": ["agentview", "robot0_eye_in_hand"], "control_freq": 20}}
    with h5py.File(path, "w") as file:
        data = file.create_group("data")
        data.attrs["problem_info"] = json.dumps(problem_info)
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["bddl_file_name"] = bddl_file
        data.attrs["macros_hash"] = ""
        for index, (actions, states) in enumerate(demos):
            steps = len(actions)
            demo = data.create_group(f"demo_{index}")
            demo.create_dataset("actions", data=np.asarray(actions, dtype=np.float64))
            demo.create_dataset("states", data=np.asarray(states, dtype=np.float64))
            demo.create_dataset("robot_states", data=np.zeros((steps, 9)))
            demo.create_dataset("rewards", data=np.eye(1, steps, steps - 1, dtype=np.uint8)[0])
            demo.create_dataset("dones", data=np.eye(1, steps, steps - 1, dtype=np.uint8)[0])
            demo.attrs["num_samples"] = steps
            demo.attrs["init_state"] = states[0]
            demo.attrs["model_file"] = ""
            obs = demo.create_group("obs")
            for name in ("agentview_rgb", "eye_in_hand_rgb"):
                obs.create_dataset(name, data=np.zeros((steps, 128, 128, 3), np.uint8))
            for name, width in (("ee_pos", 3), ("ee_ori", 3), ("ee_states", 6), ("gripper_states", 2),
                                ("joint_states", 7)):
                obs.create_dataset(name, data=np.zeros((steps, width)))
        data.attrs["num_demos"] = len(demos)
        data.attrs["total"] = sum(len(actions) for actions, _ in demos)
    return path
