"""SFT: the token cross-entropy against a hand-written OpenVLA training forward, and the SFT loop on toy demos."""

import json
import math
import os
import subprocess
import sys
import time
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from libero_env import EpisodeSpec
from libero_env.demos import (Episode, episode_key, episode_paths, load_episode, save_episode,
                              write_dataset_statistics)
from libero_env.toy import ToyVectorEnv
from scripts.make_small_vla import SmallVla, make_small_vla
from sft import lr_factor, run_sft
from trainer.checkpoint import checkpoint_dirs, checkpoint_iteration
from trainer.config import SftConfig, config_to_dict
from trainer.errors import UserError
from trainer.demo_batches import CROP_SHIFT, DemoBatches, action_chunks, augment, image_augmentation, read_demo_steps
from vla_actor import LoraSettings, VLAPolicy, load_policy, make_tiny_checkpoint
from vla_actor.action_tokens import detokenize

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "Open the drawer", "put the bowl on the stove"]


def sft_config(**flat):
    """An SftConfig from flat field names, as its flags spell them (each group omits its prefix)."""
    groups = {}
    for group in ("model", "lora", "optim"):
        default = getattr(SftConfig(demos=Path(), output_dir=Path()), group)
        names = {field.name for field in dataclasses.fields(default)}
        groups[group] = dataclasses.replace(default, **{k: flat.pop(k) for k in list(flat) if k in names})
    return SftConfig(**flat, **groups)


def images(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)


def proprio(batch, seed=0):
    return np.random.default_rng(seed).normal(0, 0.1, (batch, 8)) + [0.0, 0.1, 1.05, 3.06, 0.0, 0.0, 0.02, -0.02]


def reference_loss(policy, image, instruction, tokens, wrist=None, state=None):
    """OpenVLA's training forward of one sample, written out (REF 3.1, 3.2, 6.2): text = BOS + prompt + 29871 +
    action tokens + </s>, labels -100 except on the action tokens and </s>; the image patches (and OFT's proprio
    token) go right after BOS with -100 labels; OFT zeroes the action embeddings and attends bidirectionally; the
    LM loss compares logits[:-1] with labels[1:]."""
    model = policy.model
    prompt = policy.prompt_ids([instruction])[0]
    text = torch.tensor([prompt + tokens.tolist() + [2]])
    labels = torch.tensor([-100] * len(prompt) + tokens.tolist() + [2])
    embeddings = model.embed_tokens(text)
    if policy.is_oft:
        keep = torch.ones(text.shape[1], 1)
        keep[len(prompt):len(prompt) + len(tokens)] = 0
        embeddings = embeddings * keep
    views = [image] if wrist is None else [image, wrist]
    pixels = torch.cat([policy.normalization(torch.as_tensor(view[None])) for view in views], dim=1)
    state = None if state is None else torch.tensor(policy.stats.normalize_proprio(state[None]), dtype=torch.float32)
    prefix = model.prefix_embeddings(pixels, state)
    sequence = torch.cat([embeddings[:, :1], prefix, embeddings[:, 1:]], dim=1)
    labels = torch.cat([labels[:1], torch.full((prefix.shape[1],), -100), labels[1:]])
    length = sequence.shape[1]
    mask = torch.zeros(1, 1, length, length) if policy.is_oft else None  # additive: nothing masked
    logits = model.language_model(inputs_embeds=sequence, attention_mask=mask).logits[0]
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


@pytest.mark.parametrize("variant", ["openvla", "oft"])
def test_token_cross_entropy_equals_the_training_forward(variant, tmp_path):
    policy = load_policy(make_tiny_checkpoint(tmp_path / variant, variant=variant), "libero_spatial")
    policy.apply_lora(LoraSettings(rank=4, alpha=8))
    params = policy.trainable_parameters()
    with torch.no_grad():  # a non-zero adapter, so that its path into the loss is exercised too
        for p in params:
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    batch = len(INSTRUCTIONS)
    frames, wrist, state = images(batch), images(batch, seed=1), proprio(batch)
    extra = dict(wrist=wrist, proprio=state) if variant == "oft" else {}
    tokens = torch.from_numpy(np.random.default_rng(2).integers(31744, 32000, (batch, policy.tokens_per_query)))

    loss = policy.token_cross_entropy(frames, INSTRUCTIONS, tokens, **extra)
    singles = [policy.token_cross_entropy(frames[i:i + 1], INSTRUCTIONS[i:i + 1], tokens[i:i + 1],
                                          **{k: v[i:i + 1] for k, v in extra.items()}) for i in range(batch)]
    references = [reference_loss(policy, frames[i], INSTRUCTIONS[i], tokens[i],
                                 wrist[i] if extra else None, state[i] if extra else None) for i in range(batch)]
    assert len({len(ids) for ids in policy.prompt_ids(INSTRUCTIONS)}) == batch  # three different paddings
    for single, reference in zip(singles, references):
        assert torch.allclose(single, reference, atol=1e-5)
    reference_mean = torch.stack(references).mean()
    assert torch.allclose(loss, reference_mean, atol=1e-5)  # padding leaves every sample's loss unchanged

    grads = torch.autograd.grad(loss, params)
    reference_grads = torch.autograd.grad(reference_mean, params)
    assert any(g.abs().sum() > 0 for g in grads)
    for grad, reference_grad in zip(grads, reference_grads):
        assert torch.allclose(grad, reference_grad, atol=1e-6, rtol=1e-4)


def test_token_cross_entropy_rejects_non_action_tokens(tmp_path):
    policy = load_policy(make_tiny_checkpoint(tmp_path / "openvla"), "libero_spatial")
    with pytest.raises(ValueError, match="action tokens"):
        policy.token_cross_entropy(images(1), INSTRUCTIONS[:1], torch.full((1, 7), 2))


def test_action_chunks_by_hand():
    actions = np.arange(10 * 7).reshape(10, 7)
    chunks = action_chunks(actions, 8)
    assert chunks.shape == (3, 8, 7)  # steps 0, 1, 2: the only ones whose 8 actions lie inside the episode
    assert np.array_equal(chunks[2], actions[2:10]) and np.array_equal(chunks[0, :, 0], np.arange(0, 56, 7))
    assert np.array_equal(action_chunks(actions, 1)[:, 0], actions)
    assert action_chunks(actions[:5], 8).shape == (0, 8, 7)


def write_toy_demos(directory, task_ids, init_indices, pushes_to_goal=2):
    """Scripted toy episodes in the libero_env.demos format: each action pushes from the cursor (proprio[:2])
    straight at the marker, so its signs are the marker's, the correct push."""
    env = ToyVectorEnv(num_envs=1, horizon=pushes_to_goal, pushes_to_goal=pushes_to_goal)
    for task_id in task_ids:
        for init_index in init_indices:
            obs, marker = env.reset([EpisodeSpec(task_id, init_index)]), env.marker_position(task_id, init_index)
            agentview, wrist, state, actions = [], [], [], []
            for _ in range(pushes_to_goal):
                action = np.array([*(marker - obs.proprio[0, :2]), 0, 0, 0, 0, 1], dtype=np.float32)
                agentview.append(obs.agentview[0])
                wrist.append(obs.wrist[0])
                state.append(obs.proprio[0])
                actions.append(action)
                result = env.step(action[None])
                obs = result.obs
            assert result.success[0]
            save_episode(directory / "episodes" / f"{episode_key(task_id, init_index)}.npz",
                         Episode("toy", task_id, init_index, env.instruction(task_id), np.stack(agentview),
                                 np.stack(wrist), np.stack(state), np.stack(actions)), image_format="png")
    return write_dataset_statistics(directory)["toy"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_sft_learns_and_exports_with_the_demos_statistics(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base")
    statistics = write_toy_demos(tmp_path / "demos", task_ids=range(4), init_indices=range(2))
    config = sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "sft", checkpoint=str(base), lora_rank=8,
                       lora_alpha=16, lr=3e-3, batch_size=8, steps=40, log_every=5, save_every=20,
                       gradient_checkpointing=False, device="cpu")
    exported = run_sft(config)

    metrics = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(5, 41, 5))
    assert metrics[-1]["sft/loss"] < 0.5 * metrics[0]["sft/loss"]
    assert all(0 <= m["sft/accuracy"] <= 1 and m["sft/lr"] == 3e-3 and m["sft/samples_per_second"] > 0
               for m in metrics)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["steps"] == 40

    assert json.loads((exported / "dataset_statistics.json").read_text())["toy"] == statistics
    assert json.loads((exported / "config.json").read_text())["norm_stats"]["toy"] == statistics
    reloaded = load_policy(exported, unnorm_key="toy")
    assert np.array_equal(reloaded.stats.q01, statistics["action"]["q01"])
    trained = load_policy(base, "libero_spatial")
    trained.load_adapter(tmp_path / "sft" / "adapter")
    episodes = [load_episode(path) for path in episode_paths(tmp_path / "demos")]
    frames = np.stack([episode.agentview[0] for episode in episodes])
    instructions = [episode.instruction for episode in episodes]
    expected = trained.sample(frames, instructions, greedy=True)
    got = reloaded.sample(frames, instructions, greedy=True)
    assert torch.equal(got.token_ids, expected.token_ids)
    targets = reloaded.action_tokens(np.stack([episode.actions[0] for episode in episodes]))
    before = load_policy(base, "libero_spatial").sample(frames, instructions, greedy=True).token_ids
    accuracy_before, accuracy_after = (before == targets).float().mean(), (got.token_ids == targets).float().mean()
    assert accuracy_after > accuracy_before + 0.4  # the demos' tokens (here 0.0 -> 0.75)
    q01, q99 = np.array(statistics["action"]["q01"][:2]), np.array(statistics["action"]["q99"][:2])
    by_hand = 0.5 * (detokenize(got.token_ids[:, :2].numpy()) + 1) * (q99 - q01) + q01
    assert np.allclose(got.actions[:, :2], by_hand, atol=1e-6)  # decoded with the demos' statistics


def test_full_oft_sft_uses_chunks_wrist_and_proprio(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base", variant="oft")
    statistics = write_toy_demos(tmp_path / "demos", task_ids=range(2), init_indices=range(2), pushes_to_goal=9)
    config = sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "sft", checkpoint=str(base),
                       finetune="full", lr=1e-3, batch_size=4, steps=6, log_every=3, save_every=3,
                       gradient_checkpointing=False, device="cpu")
    exported = run_sft(config)
    metrics = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert metrics[-1]["sft/loss"] < metrics[0]["sft/loss"]
    assert not (tmp_path / "sft" / "adapter").exists()
    reloaded = load_policy(exported, unnorm_key="toy")
    assert reloaded.is_oft and reloaded.uses_proprio and reloaded.num_images == 2
    assert np.array_equal(reloaded.stats.proprio_q99, statistics["proprio"]["q99"])
    original = load_policy(base, "libero_spatial")
    changed = [not torch.equal(a, b) for a, b in zip(reloaded.model.parameters(), original.model.parameters())]
    assert sum(changed) > len(changed) // 2


def test_bad_inputs_raise_one_clear_error(tmp_path):
    base = str(tmp_path / "no-model-needed")  # these errors come before the checkpoint is read
    (tmp_path / "no-model-needed").mkdir()
    (tmp_path / "no-model-needed" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="demo directory .* does not exist"):
        run_sft(sft_config(demos=tmp_path / "missing", output_dir=tmp_path / "out", checkpoint=base))
    (tmp_path / "empty" / "episodes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no episodes in"):
        run_sft(sft_config(demos=tmp_path / "empty", output_dir=tmp_path / "out", checkpoint=base))
    write_toy_demos(tmp_path / "demos", task_ids=[0], init_indices=[0])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="already exists; pass --resume"):
        run_sft(sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "taken", checkpoint=base))
    with pytest.raises(FileExistsError, match="is not an SFT output directory"):
        run_sft(sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "taken", checkpoint=base, resume=True))
    with pytest.raises(ValueError, match="unnorm_key 'libero_spatial' is not in"):
        run_sft(sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "out", checkpoint=base,
                          unnorm_key="libero_spatial"))
    with pytest.raises(ValueError, match="warmup_steps must be a finite number >= 0, got -1"):
        run_sft(sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "out", checkpoint=base, warmup_steps=-1))
    with pytest.raises(ValueError, match="--base-quant nf4 stores a frozen quantized base, which --finetune full"):
        run_sft(sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "out", checkpoint=base, finetune="full",
                           base_quant="nf4"))
    assert not (tmp_path / "out").exists()

    # A run directory continues only with its own settings, and not from a checkpoint past `steps`.
    run = sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "run", checkpoint=base, lr=1e-3, steps=20)
    (tmp_path / "run" / "checkpoints" / "iter_000010").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config_to_dict(run)))
    with pytest.raises(ValueError, match=r"these differ: --lr \(saved 0.001, given 0.002\)"):
        run_sft(dataclasses.replace(run, optim=dataclasses.replace(run.optim, lr=2e-3), resume=True))
    with pytest.raises(ValueError, match="iter_000010 is past steps=5; pass --steps 10 or more"):
        run_sft(dataclasses.replace(run, steps=5, resume=True))

    # A run directory of the earlier SFT layout is refused in one line that names the way out.
    (tmp_path / "earlier" / "checkpoint" / "step_000010").mkdir(parents=True)
    (tmp_path / "earlier" / "config.json").write_text(json.dumps({"steps": 20}))
    with pytest.raises(ValueError, match=r"earlier layout \(checkpoint/step_N\).*choose a new output_dir") as error:
        run_sft(dataclasses.replace(run, output_dir=tmp_path / "earlier", resume=True))
    assert "\n" not in str(error.value)


def test_lr_factor_by_hand():
    assert [lr_factor(k, 0, 10, "constant") for k in range(3)] == [1.0, 1.0, 1.0]
    assert [lr_factor(k, 3, 10, "constant") for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine over the 7 steps after a warmup of 3: 0.5 (1 + cos(pi (k - 3) / 7))
    cosine = [lr_factor(k, 3, 10, "cosine") for k in range(10)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(cosine[5], 0.5 * (1 + math.cos(2 * math.pi / 7)))
    assert math.isclose(cosine[9], 0.5 * (1 + math.cos(6 * math.pi / 7)))
    assert all(a > b for a, b in zip(cosine[3:], cosine[4:]))
    assert lr_factor(10, 3, 10, "cosine") == 0.0


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    write_toy_demos(tmp_path / "demos", task_ids=range(2), init_indices=range(2), pushes_to_goal=3)  # 12 samples
    samples = read_demo_steps(tmp_path / "demos", 1)
    targets = torch.arange(len(samples))
    batches = DemoBatches(samples, targets, 5, seed=3, wrist=True, proprio=True, image_aug=True)
    epoch = [batches.rows(step) for step in (1, 2)]  # 12 // 5 = 2 batches an epoch, the last 2 samples dropped
    assert len(set(np.concatenate(epoch).tolist())) == 10
    assert not np.array_equal(batches.rows(3), epoch[0])  # a new shuffle for the next epoch

    rng_before = torch.get_rng_state()
    first = batches[2]
    again = DemoBatches(samples, targets, 5, seed=3, wrist=True, proprio=True, image_aug=True)[2]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the augmentation leaves the global generator alone
    assert torch.equal(first["targets"], torch.from_numpy(epoch[1]))
    assert torch.equal(first["proprio"], torch.from_numpy(samples.proprio[epoch[1]]))
    assert first["images"].dtype == torch.uint8 and first["images"].shape == (5, 224, 224, 3)
    for name in ("images", "wrist"):
        assert torch.equal(first[name], again[name])
        plain = torch.from_numpy(samples.images(epoch[1], wrist=name == "wrist"))
        assert not torch.equal(first[name], plain)
    unaugmented = DemoBatches(samples, targets, 5, seed=3, wrist=False, proprio=False, image_aug=False)[2]
    assert torch.equal(unaugmented["images"], torch.from_numpy(samples.images(epoch[1])))
    assert "wrist" not in unaugmented and "proprio" not in unaugmented

    same = np.repeat(samples.images(np.array([0])), 4, axis=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        varied = augment(same, image_augmentation())
    assert len({varied[i].numpy().tobytes() for i in range(4)}) == 4  # every image its own draw


def test_augmentation_crop_is_a_shift_at_the_evaluation_scale():
    assert CROP_SHIFT == 6  # (1 - sqrt(0.9)) / 2 of the frame, in the centre crop's 224 / sqrt(0.9) pixels: 6.06
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8))
    crop = image_augmentation().transforms[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(5):
            out = crop(image)
            inner = out[:, 6:-6, 6:-6]
            shifts = [(dy, dx) for dy in range(-6, 7) for dx in range(-6, 7)
                      if torch.equal(inner, image[:, 6 + dy:218 + dy, 6 + dx:218 + dx])]
            assert len(shifts) == 1


def sft_settings(tmp_path, base, **overrides):
    return dict(demos=tmp_path / "demos", checkpoint=str(base), gradient_checkpointing=False, device="cpu",
                **overrides)


def read_tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[key], b[key]) for key in a)


def without_time(metrics):
    return [{k: v for k, v in m.items() if k not in ("time", "sft/samples_per_second", "sft/data_wait")}
            for m in metrics]


def test_stopped_oft_run_with_augmentation_and_cosine_resumes_exactly(tmp_path):
    """The whole SFT path: full fine-tuning of OFT (2 images, proprio) with image augmentation, warmup, cosine and
    weight decay, stopped by max_seconds after its first step, then resumed; it ends as an uninterrupted run."""
    base = make_tiny_checkpoint(tmp_path / "base", variant="oft")
    write_toy_demos(tmp_path / "demos", task_ids=range(2), init_indices=range(2), pushes_to_goal=9)
    settings = sft_settings(tmp_path, base, finetune="full", lr=1e-3, lr_schedule="cosine", warmup_steps=2,
                            weight_decay=0.1, image_aug=True, batch_size=4, steps=6, log_every=2, save_every=4)
    stopped = run_sft(sft_config(**settings, output_dir=tmp_path / "sft", max_seconds=1e-9))
    assert stopped == tmp_path / "sft" / "checkpoints" / "iter_000001"
    assert not (tmp_path / "sft" / "model").exists() and not (tmp_path / "sft" / "metrics.jsonl").exists()
    resumed = run_sft(sft_config(**settings, output_dir=tmp_path / "sft", resume=True))
    reference = run_sft(sft_config(**settings, output_dir=tmp_path / "reference"))

    assert_same_tensors(read_tensors(resumed), read_tensors(reference))
    metrics = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert without_time(metrics) == without_time(read_jsonl(tmp_path / "reference" / "metrics.jsonl"))
    expected_lr = [1e-3 * f for f in (2 / 3, 0.5 * (1 + math.cos(math.pi / 4)), 0.5 * (1 + math.cos(3 * math.pi / 4)))]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert np.allclose([m["sft/lr"] for m in metrics], expected_lr, rtol=1e-12)
    assert sorted(p.name for p in (tmp_path / "sft" / "checkpoints").iterdir()) == ["iter_000006"]
    reloaded = load_policy(resumed, unnorm_key="toy")
    assert reloaded.is_oft and reloaded.num_images == 2 and reloaded.uses_proprio

    again = run_sft(sft_config(**settings, output_dir=tmp_path / "sft", resume=True))  # finished: exports only
    assert again == resumed and len(read_jsonl(tmp_path / "sft" / "metrics.jsonl")) == 3


CHILD = """
import json, sys
from pathlib import Path
from sft import run_sft
from tests.test_sft import sft_config
settings = json.loads(sys.argv[1])
run_sft(sft_config(**{**settings, "demos": Path(settings["demos"]), "output_dir": Path(settings["output_dir"])}))
"""


def logged_past_checkpoint(output_dir):
    """True once the run has a checkpoint and a metrics line after it (that a kill now leaves to be dropped)."""
    saved, metrics = checkpoint_dirs(output_dir), output_dir / "metrics.jsonl"
    if not saved or not metrics.is_file():
        return False
    complete_lines = metrics.read_text().split("\n")[:-1]
    return bool(complete_lines) and json.loads(complete_lines[-1])["step"] > checkpoint_iteration(saved[-1])


def test_killed_lora_run_resumes_exactly(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "base")
    write_toy_demos(tmp_path / "demos", task_ids=range(4), init_indices=range(2))
    settings = sft_settings(tmp_path, base, lora_rank=4, lora_alpha=8, lr=3e-3, batch_size=4, steps=30, log_every=3,
                            save_every=4)
    output_dir = tmp_path / "sft"
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({**settings, "demos": str(tmp_path / "demos"),
                                                                            "output_dir": str(output_dir)})],
                                 cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not logged_past_checkpoint(output_dir) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.kill()
        child.wait()
    saved = checkpoint_dirs(output_dir)
    assert saved, (tmp_path / "child.log").read_text()
    assert json.loads((saved[-1] / "trainer_state.json").read_text())["iteration"] < 30  # killed mid-run

    # A loader worker process makes the same batches as the main process does.
    resumed = run_sft(sft_config(**settings, output_dir=output_dir, resume=True, loader_workers=1))
    reference = run_sft(sft_config(**settings, output_dir=tmp_path / "reference"))
    assert_same_tensors(read_tensors(output_dir / "adapter"), read_tensors(tmp_path / "reference" / "adapter"))
    assert_same_tensors(read_tensors(resumed), read_tensors(reference))
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(3, 31, 3))  # each line once, the killed run's included
    assert without_time(metrics) == without_time(read_jsonl(tmp_path / "reference" / "metrics.jsonl"))


def test_make_small_vla_writes_the_preset_with_the_demos_statistics(tmp_path, capsys):
    statistics = write_toy_demos(tmp_path / "demos", task_ids=[0], init_indices=[0])
    directory = make_small_vla(SmallVla(output_dir=tmp_path / "small", demos=tmp_path / "demos"))
    policy = load_policy(directory, unnorm_key="toy")
    assert policy.is_oft and policy.num_images == 2 and policy.uses_proprio
    assert np.array_equal(policy.stats.q99, statistics["action"]["q99"])
    text_config = json.loads((directory / "config.json").read_text())["text_config"]
    assert (text_config["hidden_size"], text_config["num_hidden_layers"], text_config["initializer_range"]) == \
        (128, 4, 0.02)
    parameters = sum(p.numel() for p in policy.model.parameters())
    assert f"{parameters:,} parameters" in capsys.readouterr().out
    assert sum(path.stat().st_size for path in directory.iterdir()) < 50e6  # the fp32 preset stays under 50 MB
    with pytest.raises(FileExistsError, match="already exists"):
        make_small_vla(SmallVla(output_dir=directory))
    with pytest.raises(ValueError, match=r"llm_dim \(100\) must be a positive multiple of llm_heads \(8\)"):
        make_small_vla(SmallVla(output_dir=tmp_path / "odd", llm_dim=100, llm_heads=8))


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_output_directory(tmp_path, monkeypatch):
    base = make_tiny_checkpoint(tmp_path / "base")
    write_toy_demos(tmp_path / "demos", task_ids=[0], init_indices=[0])
    monkeypatch.setattr(VLAPolicy, "token_cross_entropy", lambda *args, **kwargs: torch.tensor(float("nan")))
    config = sft_config(demos=tmp_path / "demos", output_dir=tmp_path / "new" / "sft", checkpoint=str(base),
                        batch_size=2, steps=4, save_every=2, gradient_checkpointing=False, device="cpu")
    with pytest.raises(UserError, match="the SFT loss is nan at step 1; lower lr"):
        run_sft(config)
    assert not (tmp_path / "new").exists()  # the same command can run again
