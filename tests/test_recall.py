"""MQAR data, metric, models and training (course_lib.recall)."""

import pytest
import torch

from course_lib import recall
from course_lib.recall import IGNORE, MQARTask, answer_accuracy, mqar_batch, recall_loss


@pytest.mark.parametrize("task", [MQARTask(64, 4, 32), MQARTask(16, 7, 21), MQARTask(9, 1, 3)])
def test_every_answer_is_the_value_that_followed_its_key_earlier(task):
    inputs, targets = mqar_batch(task, 8, seed=3)
    assert inputs.shape == targets.shape == (8, task.seq_len)
    K = (task.vocab_size - 1) // 2
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        pairs = {row_in[2 * i]: row_in[2 * i + 1] for i in range(task.num_pairs)}
        assert len(pairs) == task.num_pairs  # distinct keys
        assert all(1 <= k <= K < v < task.vocab_size for k, v in pairs.items())
        answers = [(t, x, y) for t, (x, y) in enumerate(zip(row_in, row_t)) if y != IGNORE]
        assert sorted(x for _, x, _ in answers) == sorted(pairs)  # every key queried exactly once
        for t, x, y in answers:
            assert t >= 2 * task.num_pairs and y == pairs[x]
        other = [x for t, (x, y) in enumerate(zip(row_in, row_t)) if y == IGNORE and t >= 2 * task.num_pairs]
        assert all(x == 0 for x in other)


def test_batches_are_seeded():
    task = MQARTask()
    a, b = mqar_batch(task, 4, seed=1), mqar_batch(task, 4, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], mqar_batch(task, 4, seed=2)[0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(mqar_batch(task, 2, generator=g1)[0], mqar_batch(task, 2, generator=g2)[0])


def test_accuracy_and_loss_count_only_answers():
    targets = torch.tensor([[IGNORE, 2, IGNORE, 1]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 0] = logits[0, 1, 2] = logits[0, 2, 0] = logits[0, 3, 0] = 5.0
    assert answer_accuracy(logits, targets) == 0.5  # position 1 right, position 3 wrong
    by_hand = torch.nn.functional.cross_entropy(logits[0, [1, 3]], torch.tensor([2, 1]))
    torch.testing.assert_close(recall_loss(logits, targets), by_hand)


def test_attention_overfits_a_tiny_recall_batch():
    torch.manual_seed(0)
    task = MQARTask(vocab_size=16, num_pairs=2, seq_len=8)
    model = recall.recall_model("attention", task, d_model=32, num_layers=2)
    inputs, targets = mqar_batch(task, 8, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = answer_accuracy(model(inputs), targets)
    for _ in range(150):
        loss = recall_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = answer_accuracy(model(inputs), targets)
    assert after > max(before, 0.9)


@pytest.mark.parametrize("mixer", list(recall.RECALL_MIXERS))
def test_every_mixer_runs_forward_and_backward(mixer):
    # long enough that every part of every layer is used (NSA compresses blocks of 16 tokens)
    task = MQARTask(vocab_size=16, num_pairs=2, seq_len=40)
    model = recall.recall_model(mixer, task, d_model=16, num_heads=2)
    inputs, targets = mqar_batch(task, 2, seed=0)
    logits = model(inputs)
    assert logits.shape == (2, 40, 16) and torch.isfinite(logits).all()
    recall_loss(logits, targets).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # causal: changing the last token changes no earlier output
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 16
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1], atol=1e-5, rtol=1e-4)


def test_recall_models_keep_the_mixers_own_initialisation_and_no_positions():
    task = MQARTask(vocab_size=16, num_pairs=2, seq_len=8)
    model = recall.recall_model("attention", task, seed=3)
    assert model.position_embedding is None  # order comes from the causal mask and the convolution
    # TinyTransformer draws its linear layers with std 0.02; the mixers keep PyTorch's default
    # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 * 64) = 0.072 for d_model = 64.
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].attention.q_proj.weight.std().item() == pytest.approx(64**-0.5 / 3**0.5, rel=0.1)
    assert not model.blocks[0].attention.rope and model.blocks[0].attention.conv_size == recall.CONV_SIZE
    gla_model = recall.recall_model("gla", task, seed=3)
    assert gla_model.blocks[0].attention.gate_up.bias.abs().sum() > 0  # not zeroed
    same = recall.recall_model("attention", task, seed=3)
    other = recall.recall_model("attention", task, seed=4)
    assert torch.equal(same.blocks[1].attention.q_proj.weight, model.blocks[1].attention.q_proj.weight)
    assert not torch.equal(other.blocks[1].attention.q_proj.weight, model.blocks[1].attention.q_proj.weight)


def test_state_bytes_follow_the_formulas():
    f32 = 4
    assert recall.state_bytes("attention", 100) == 2 * 2 * 100 * 64 * f32
    assert recall.state_bytes("sliding_window", 100) == 2 * 2 * recall.WINDOW * 64 * f32
    assert recall.state_bytes("sliding_window", 4) == 2 * 2 * 4 * 64 * f32
    assert recall.state_bytes("gla", 100) == recall.state_bytes("gla", 10_000) == 2 * 4 * 16 * 16 * f32
    assert recall.state_bytes("mamba2", 100) == 2 * 128 * 16 * f32


def test_train_recall_and_grid_run_end_to_end():
    task = MQARTask(vocab_size=16, num_pairs=2, seq_len=8)
    result = recall.train_recall(
        "gla", task, steps=3, batch_size=4, d_model=16, num_heads=2, eval_every=2, progress=False
    )
    assert len(result["losses"]) == 3 and [s for s, _ in result["curve"]] == [2, 3]
    assert 0.0 <= result["accuracy"] <= 1.0
    rows = recall.recall_grid(
        ["attention", "deltanet"], [task], steps=2, batch_size=4, d_model=16, num_heads=2, progress=False
    )
    assert [r["mixer"] for r in rows] == ["attention", "deltanet"] and "model" not in rows[0]


def test_bad_input():
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTask(vocab_size=9, num_pairs=5)
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(num_pairs=4, seq_len=11)
    with pytest.raises(TypeError, match="task"):
        mqar_batch((64, 4, 32), 2)
    with pytest.raises(ValueError, match="batch_size"):
        mqar_batch(MQARTask(), 0)
    with pytest.raises(ValueError, match="mixer"):
        recall.recall_model("transformer", MQARTask())
    with pytest.raises(ValueError, match="targets"):
        answer_accuracy(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="answer"):
        answer_accuracy(torch.zeros(1, 4, 3), torch.full((1, 4), IGNORE))
    model = recall.recall_model("gla", MQARTask(16, 2, 8), d_model=16, num_heads=2)
    with pytest.raises(ValueError, match="cache"):
        model.make_cache(1)
