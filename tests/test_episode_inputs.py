"""Episodes v2: inputs that are dicts of tensors (a text family's token ids and masks), in ragged meta-batches, through
the loop runner, MAML and ProtoNet: the meta-gradient of a ragged meta-batch is the mean of its tasks' own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalab.algorithms import MAML, Context, ProtoNet
from metalab.runner import TaskRunner
from metalab.tasks.episodes import Episodes, Task


class BagOfTokens(nn.Module):
    """Mean of the embeddings of the unmasked tokens, then a linear head: takes ``{"ids": (B, L), "mask": (B, L)}``."""

    def __init__(self, vocabulary: int = 30, width: int = 8, ways: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, ways)

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["mask"].unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(inputs["ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(inputs))


def sentence_task(generator: torch.Generator, shots: int, length: int) -> Task:
    """3 ways, ``shots`` support and 2 query sentences per way of ``length`` tokens (a padded tail masked out)."""
    def sentences(count: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = torch.arange(3).repeat_interleave(count)
        ids = torch.randint(0, 10, (len(labels), length), generator=generator) + 10 * labels.unsqueeze(1)
        mask = torch.ones(len(labels), length, dtype=torch.long)
        mask[:, length - 1:] = 0  # padding
        return {"ids": ids, "mask": mask}, labels

    support_x, support_y = sentences(shots)
    query_x, query_y = sentences(2)
    return Task(support_x, support_y, query_x, query_y)


def ragged_sentences() -> Episodes:
    generator = torch.Generator().manual_seed(0)
    return Episodes.of([sentence_task(generator, shots, length) for shots, length in ((1, 5), (3, 7), (2, 4))])


def test_dict_inputs_of_different_shapes_stay_ragged_and_index_and_move_as_tensors_do() -> None:
    episodes = ragged_sentences()
    assert not episodes.stacked and len(episodes) == 3
    task = episodes[1]
    assert task.support_x["ids"].shape == (9, 7) and task.query_x["mask"].shape == (6, 7)
    moved = episodes[1:].to("cpu")
    assert len(moved) == 2 and torch.equal(moved[0].support_x["ids"], task.support_x["ids"])
    same = Episodes.of([task, task])
    assert same.stacked and same.support_x["ids"].shape == (2, 9, 7)  # one shape: stacked per key


def test_maml_meta_gradient_of_a_ragged_text_batch_is_the_mean_of_its_tasks() -> None:
    torch.manual_seed(0)
    model, episodes = BagOfTokens().double(), ragged_sentences()
    context = Context(F.cross_entropy, training=True)

    def gradient(batch: Episodes) -> list[torch.Tensor]:
        algorithm = MAML(model, inner_lr=0.5)
        algorithm.zero_grad()
        _, loss = TaskRunner("loop").meta_loss(algorithm, batch, context)
        loss.backward()
        return [p.grad.clone() for p in algorithm.parameters()]

    whole = gradient(episodes)
    each = [gradient(episodes[i:i + 1]) for i in range(len(episodes))]
    for total, *parts in zip(whole, *each, strict=True):
        torch.testing.assert_close(total, sum(parts) / len(parts), rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in whole)


def test_protonet_classifies_ragged_text_tasks_from_their_support_sentences() -> None:
    """Each class's tokens come from its own range of the vocabulary: prototypes of a random embedding separate them."""
    torch.manual_seed(0)
    algorithm = ProtoNet(BagOfTokens(width=16))  # its features: the mean embedding (the head is unused)
    predictions = TaskRunner("loop").predictions(algorithm, ragged_sentences(), Context(F.cross_entropy,
                                                                                      training=False))
    accuracy = [float((p.argmax(-1) == t.query_y).float().mean()) for p, t in zip(predictions, ragged_sentences(),
                                                                                  strict=True)]
    assert min(accuracy) >= 2 / 3, accuracy  # chance: 1/3

