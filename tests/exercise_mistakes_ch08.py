"""Wrong solutions of chapter 08's MQAR evaluation (8.4), one per misconception: each must fail its checker
with a message that names it (the fragment). Exercises 8.1-8.3 keep theirs in tests/exercise_mistakes.py."""

import torch

import course_lib
from course_lib.recall import IGNORE


def _evaluate(
    model, batches, num_pairs, edges, *, eval_mode=True, no_grad=True, restore=True, per_batch=False,
    offset=0, from_end=False, closed=False, empty=None, count_ignore=False,
):  # fmt: skip
    was_training = model.training
    if eval_mode:
        model.eval()
    hits, distances, scores = [], [], []
    with torch.no_grad() if no_grad else torch.enable_grad():
        for inputs, targets in batches:
            guesses = model(inputs).argmax(-1)
            if count_ignore:
                hits.append((guesses == targets).flatten())
                distances.append(torch.zeros(hits[-1].numel(), dtype=torch.long))
                scores.append(hits[-1].double().mean().item())
                continue
            rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
            hits.append(guesses[rows, positions] == targets[rows, positions])
            keys = inputs[rows, : 2 * num_pairs : 2]
            pair = (keys == inputs[rows, positions].unsqueeze(1)).int().argmax(-1)
            start = 2 * num_pairs if from_end else 2 * pair + offset
            distances.append(positions - start)
            scores.append(hits[-1].double().mean().item())
    if restore:
        model.train(was_training)
    hits, distances = torch.cat(hits).double(), torch.cat(distances)
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (
            (distances > low) & (distances <= high) if closed else (distances >= low) & (distances < high)
        )
        bins.append(hits[inside].mean().item() if inside.any() else empty)
    accuracy = sum(scores) / len(scores) if per_batch else hits.mean().item()
    return accuracy, bins


def _library(model, batches, num_pairs, edges):
    from course_lib.recall import MQARTask, accuracy_by_distance, answer_distances

    model.eval()
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    task = MQARTask(vocab_size=64, num_pairs=num_pairs, seq_len=inputs.shape[1])
    with torch.no_grad():
        logits = model(inputs)
    bins = accuracy_by_distance(logits, targets, answer_distances(inputs, targets, task), edges)
    return course_lib.recall.answer_accuracy(logits, targets), [b[2] for b in bins]


MISTAKES = {
    "8.4": [
        (
            "per-batch accuracies averaged",
            "batches of different sizes",
            lambda *a: _evaluate(*a, per_batch=True),
        ),
        ("the model left in training mode", "call model.eval()", lambda *a: _evaluate(*a, eval_mode=False)),
        ("gradients on", "torch.no_grad()", lambda *a: _evaluate(*a, no_grad=False)),
        (
            "the mode not restored",
            "leave it in the mode you found it",
            lambda *a: _evaluate(*a, restore=False),
        ),
        ("distances from the value", "from the value (2i + 1)", lambda *a: _evaluate(*a, offset=1)),
        (
            "distances from the end of the pairs",
            "from the end of the pairs",
            lambda *a: _evaluate(*a, from_end=True),
        ),
        ("bins closed on the right", "(low, high]", lambda *a: _evaluate(*a, closed=True)),
        ("an empty bin scored 0", "return None for it", lambda *a: _evaluate(*a, empty=0.0)),
        ("IGNORE positions counted", "IGNORE ones included", lambda *a: _evaluate(*a, count_ignore=True)),
        ("the library's recall helpers", "course's own code", _library),
    ],
}
