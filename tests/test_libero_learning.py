"""scripts/libero_learning.py's evals, run for real on the toy suite: greedy on held-out and training init states,
and sampled at the rollout temperature on the training ones."""

import json
from pathlib import Path

import pytest

from scripts.libero_learning import Experiment, evaluate, success_rate

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("protocol, episodes, temperature", [("heldout", 10, None), ("train", 3, None),
                                                             ("sampled", 3, 0.7)])
def test_eval_stages_take_their_split_and_temperature(checkpoint, tmp_path, monkeypatch, protocol, episodes,
                                                      temperature):
    monkeypatch.chdir(REPO)  # the stages run OpenVLA_GRPO.py from the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    experiment = Experiment(work_dir=tmp_path, suite="toy", tasks=(0,), workers=2, max_steps=1, temperature=0.7,
                            train_eval_per_task=3, eval_videos=False)
    results = evaluate(experiment, f"eval_sft_{protocol}", checkpoint, protocol)
    recorded = json.loads(results.read_text())
    assert recorded["overall"]["episodes"] == episodes and 0 <= success_rate(results) <= 1
    assert recorded["config"]["protocol"] == ("heldout" if protocol == "heldout" else "train")
    assert recorded["config"]["temperature"] == temperature
    assert json.loads((tmp_path / "stage_seconds.json").read_text())[f"eval_sft_{protocol}"] > 0
