"""SFT: the token cross-entropy against a hand-written OpenVLA training forward, and the SFT loop on toy demos."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libero_env import EpisodeSpec
from libero_env.demos import (Episode, episode_key, episode_paths, load_episode, save_episode,
                              write_dataset_statistics)
from libero_env.toy import ToyVectorEnv
from trainer.sft import SftConfig, action_chunks, run_sft
from vla_actor import LoraSettings, load_policy, make_tiny_checkpoint
from vla_actor.action_tokens import detokenize

torch.set_num_threads(1)
INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "Open the drawer", "put the bowl on the stove"]


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
    config = SftConfig(demos=tmp_path / "demos", output_dir=tmp_path / "sft", checkpoint=str(base), lora_rank=8,
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
    config = SftConfig(demos=tmp_path / "demos", output_dir=tmp_path / "sft", checkpoint=str(base),
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
    base = str(tmp_path / "no-model-needed")
    with pytest.raises(FileNotFoundError, match="demo directory .* does not exist"):
        run_sft(SftConfig(demos=tmp_path / "missing", output_dir=tmp_path / "out", checkpoint=base))
    (tmp_path / "empty" / "episodes").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no episodes in"):
        run_sft(SftConfig(demos=tmp_path / "empty", output_dir=tmp_path / "out", checkpoint=base))
    write_toy_demos(tmp_path / "demos", task_ids=[0], init_indices=[0])
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        run_sft(SftConfig(demos=tmp_path / "demos", output_dir=tmp_path / "taken", checkpoint=base))
    with pytest.raises(ValueError, match="unnorm_key 'libero_spatial' is not in"):
        run_sft(SftConfig(demos=tmp_path / "demos", output_dir=tmp_path / "out", checkpoint=base,
                          unnorm_key="libero_spatial"))
    assert not (tmp_path / "out").exists()
