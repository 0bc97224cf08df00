"""Batched sampling, teacher-forced log-probs, the processor's normalisation, input errors (tiny checkpoints)."""

import numpy as np
import pytest
import torch

from vla_actor import load_policy, make_tiny_checkpoint
from vla_actor.action_tokens import ACTION_TOKEN_BEGIN
from vla_actor.fast_decode import DynamicDecoder

torch.set_num_threads(1)
INSTRUCTIONS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
                "Open the drawer", "put the bowl on the stove"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "openvla"), "libero_spatial")


@pytest.fixture(scope="module")
def oft(tmp_path_factory):
    return load_policy(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "oft", variant="oft"),
                       "libero_spatial")


def images(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)


def proprio(batch, seed=0):
    return np.random.default_rng(seed).normal(0, 0.1, (batch, 8)) + [0.0, 0.1, 1.05, 3.06, 0.0, 0.0, 0.02, -0.02]


def test_prompts_padded_past_their_length_decode_the_same(policy):
    """Kept CUDA graphs pad shorter prompts to the kept prompt length (_Inputs.padded_to); the added positions are
    masked out, so the prefill's and a decode step's action log-probs do not change (here on the eager decoder)."""
    config = policy.model.language_model.config
    with torch.no_grad():
        prefix = policy.model.prefix_embeddings(policy._pixel_values(images(3), None, 3), None)
        inputs = policy._inputs(prefix, policy.prompt_ids(INSTRUCTIONS), None)
        padded = inputs.padded_to(inputs.valid.shape[1] + 7)
        assert padded.valid.shape[1] == inputs.valid.shape[1] + 7 and not padded.valid[:, -7:].any()
        assert not padded.embeddings[:, -7:].any() and inputs.padded_to(3) is inputs
        log_probs = []
        for batch in (inputs, padded):
            decoder = DynamicDecoder(policy._llama, config, batch.valid, batch.prompt_end)
            first = policy._readout(batch, decoder.prefill(batch.embeddings), 1, 1.0)[:, 0]
            token = policy.model.embed_tokens(first.argmax(-1)[:, None] + ACTION_TOKEN_BEGIN)
            log_probs.append((first, policy._action_log_softmax(decoder.step(token)[:, 0], 1.0)))
    for unpadded, longer in zip(*log_probs):
        assert torch.allclose(unpadded, longer, atol=1e-5)


def test_prompt_ids(policy):
    ids = policy.prompt_ids(["Pick Up The Bowl", "open the drawer"])
    assert all(row[0] == 1 and row[-1] == 29871 and row.count(29871) >= 1 for row in ids)
    assert len(ids[0]) != len(ids[1])
    lower = policy.tokenizer("In: What action should the robot take to pick up the bowl?\nOut:").input_ids
    assert ids[0] == lower + [29871]


def test_pixel_normalisation_hand_values(policy):
    pixels = policy.normalization(torch.tensor([[[[255, 0, 128]]]], dtype=torch.uint8))
    # DINO: (x - bf16 ImageNet mean) / bf16 std; SigLIP: (x - 0.5) / 0.5
    expected = [(1 - 0.484375) / 0.228515625, (0 - 0.455078125) / 0.2236328125, (128 / 255 - 0.40625) / 0.224609375,
                1.0, -1.0, 128 / 255 * 2 - 1]
    assert torch.allclose(pixels.flatten(), torch.tensor(expected), atol=1e-6)


def test_batched_equals_single_openvla(policy):
    frames = images(3)
    batched = policy.sample(frames, INSTRUCTIONS, temperature=1.6, greedy=True)
    assert batched.token_ids.shape == (3, 7) and batched.token_ids.dtype == torch.long
    assert batched.log_probs.dtype == torch.float32 and batched.actions.dtype == np.float32
    assert batched.actions.shape == (3, 7)
    assert ((batched.token_ids >= 31744) & (batched.token_ids <= 31999)).all()
    for i in range(3):
        single = policy.sample(frames[i:i + 1], INSTRUCTIONS[i:i + 1], temperature=1.6, greedy=True)
        assert torch.equal(single.token_ids[0], batched.token_ids[i])
        assert torch.allclose(single.log_probs[0], batched.log_probs[i], atol=1e-5)
        assert np.array_equal(single.actions[0], batched.actions[i])
    assert len({tuple(row) for row in batched.token_ids.tolist()}) > 1  # the observations matter


def test_batched_equals_single_oft(oft):
    frames, wrist, state = images(3), images(3, seed=1), proprio(3)
    batched = oft.sample(frames, INSTRUCTIONS, wrist=wrist, proprio=state, greedy=True)
    assert batched.token_ids.shape == (3, 56) and batched.actions.shape == (3, 8, 7)
    for i in range(3):
        single = oft.sample(frames[i:i + 1], INSTRUCTIONS[i:i + 1], wrist=wrist[i:i + 1], proprio=state[i:i + 1],
                            greedy=True)
        assert torch.equal(single.token_ids[0], batched.token_ids[i])
        assert torch.allclose(single.log_probs[0], batched.log_probs[i], atol=1e-5)
    swapped = oft.sample(wrist, INSTRUCTIONS, wrist=frames, proprio=state, greedy=True)
    assert not torch.equal(swapped.log_probs, batched.log_probs)  # the two cameras are not interchangeable


@pytest.mark.parametrize("variant", ["policy", "oft"])
def test_rollout_log_probs_equal_teacher_forced(variant, request):
    model = request.getfixturevalue(variant)
    extra = dict(wrist=images(3, seed=1), proprio=proprio(3)) if variant == "oft" else {}
    frames = images(3, seed=2)
    generator = torch.Generator().manual_seed(0)
    out = model.sample(frames, INSTRUCTIONS, temperature=1.6, generator=generator, **extra)
    log_probs, entropy = model.log_probs(frames, INSTRUCTIONS, out.token_ids, temperature=1.6, **extra)
    assert log_probs.dtype == torch.float32 and log_probs.requires_grad is False
    assert torch.allclose((log_probs - out.log_probs).exp(), torch.ones_like(log_probs), atol=1e-5)
    assert ((entropy > 0) & (entropy <= np.log(256) + 1e-5)).all()
    again = model.sample(frames, INSTRUCTIONS, temperature=1.6, generator=torch.Generator().manual_seed(0), **extra)
    assert torch.equal(again.token_ids, out.token_ids)


def test_temperature_and_entropy_are_those_of_the_256_way_softmax(policy):
    frames = images(2, seed=4)
    out = policy.sample(frames, INSTRUCTIONS[:2], temperature=1.0, greedy=True)
    cold, cold_entropy = policy.log_probs(frames, INSTRUCTIONS[:2], out.token_ids, temperature=0.5)
    warm, warm_entropy = policy.log_probs(frames, INSTRUCTIONS[:2], out.token_ids, temperature=1.0)
    assert (cold > warm).all() and (cold_entropy < warm_entropy).all()  # greedy tokens gain mass when colder
    huge, huge_entropy = policy.log_probs(frames, INSTRUCTIONS[:2], out.token_ids, temperature=1e6)
    assert torch.allclose(huge, torch.full_like(huge, -np.log(256)), atol=1e-4)
    assert torch.allclose(huge_entropy, torch.full_like(huge, np.log(256)), atol=1e-4)


def test_log_probs_have_gradients_only_where_asked(policy):
    frames = images(2)
    tokens = policy.sample(frames, INSTRUCTIONS[:2], greedy=True).token_ids
    with torch.no_grad():
        log_probs, _ = policy.log_probs(frames, INSTRUCTIONS[:2], tokens)
    assert not log_probs.requires_grad and not policy.model.training


def test_action_tokens_round_trip(policy, oft):
    tokens = torch.tensor([[31745, 31808, 31872, 31999, 31900, 31760, 31990]])
    assert torch.equal(policy.action_tokens(policy.decode(tokens)), tokens)
    assert policy.action_tokens(policy.decode(torch.tensor([[31744] * 7])))[0, 0] == 31745  # shares the top bin
    actions = policy.decode(tokens)
    # id 31872 -> 0.0 -> the midpoint of [q01, q99] on dim 2; the gripper (mask False) keeps its bin value
    q01, q99 = policy.stats.q01[2], policy.stats.q99[2]
    assert actions[0, 2] == pytest.approx(0.5 * (q99 + q01), abs=1e-6)
    assert actions[0, 6] == pytest.approx(-1 + 19 / 255, abs=1e-6)  # id 31990 -> centre 9 = -1 + 19/255
    chunk = torch.randint(31745, 32000, (2, 56))
    assert torch.equal(oft.action_tokens(oft.decode(chunk)), chunk)
    with pytest.raises(ValueError, match=r"actions must be finite \[B, 8, 7\]"):
        oft.action_tokens(np.zeros((2, 7)))


def test_bad_inputs(policy, oft):
    frames = images(2)
    good = INSTRUCTIONS[:2]
    cases = [
        (lambda: policy.sample(frames[:, :200], good), "images must be uint8 \\[B, 224, 224, 3\\]"),
        (lambda: policy.sample(frames.astype(np.float32), good), "images must be uint8"),
        (lambda: policy.sample(frames[:0], []), "instructions is empty"),
        (lambda: policy.sample(frames, good[:1]), "got 2 images but 1 instructions"),
        (lambda: policy.sample(frames, "pick up the bowl"), "list of strings"),
        (lambda: policy.sample(frames, good, temperature=0.0), "temperature must be a finite number > 0"),
        (lambda: policy.sample(frames, good, temperature=float("nan")), "temperature must be"),
        (lambda: policy.sample(frames, good, wrist=frames), "pass wrist images as None"),
        (lambda: policy.sample(frames, good, proprio=proprio(2)), "takes no proprio"),
        (lambda: oft.sample(frames, good, proprio=proprio(2)), "pass wrist images too"),
        (lambda: oft.sample(frames, good, wrist=frames), "needs proprio"),
        (lambda: oft.sample(frames, good, wrist=frames[:, :, :100], proprio=proprio(2)), "wrist must be uint8"),
        (lambda: oft.sample(frames, good, wrist=frames, proprio=proprio(2)[:, :7]), "8 values per sample"),
        (lambda: oft.sample(frames, good, wrist=frames, proprio=np.full((2, 8), np.nan)), "proprio must be finite"),
        (lambda: policy.log_probs(frames, good, torch.full((2, 7), 31743)), "in \\[31744, 31999\\]"),
        (lambda: policy.log_probs(frames, good, torch.full((2, 56), 31800)), "token_ids must be long \\[2, 7\\]"),
        (lambda: policy.log_probs(frames, good, torch.full((2, 7), 31800.0)), "token_ids must be long"),
        (lambda: policy.log_probs(frames, good, torch.full((2, 7), 31800), temperature=-1), "temperature"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_tensor_images_are_accepted(policy):
    frames = images(2)
    from_numpy = policy.sample(frames, INSTRUCTIONS[:2], greedy=True)
    from_tensor = policy.sample(torch.from_numpy(frames), INSTRUCTIONS[:2], greedy=True)
    assert torch.equal(from_numpy.token_ids, from_tensor.token_ids)
