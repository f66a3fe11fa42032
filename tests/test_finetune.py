"""algorithm=finetune: pre-training on labelled examples, then a head fitted per task on the frozen embedding."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LogisticRegression
from torch import nn

from metalab.algorithms import FineTune
from metalab.algorithms.finetune import CosineClassifier
from metalab.checks import serve_examples
from metalab.errors import ConfigError
from metalab.job import train
from metalab.models import CNN4
from metalab.tasks import SinusoidRegression, WordNetGlosses
from metalab.tasks.classification import Pretraining, _EndlessExampleBatches
from metalab.tasks.episodes import Task
from metalab.tasks.images import PAD, ImageClassFamily, LabelledImages
from tests.conftest import run_cli


class NumberedImages(ImageClassFamily):
    """10 classes of 7 training images each; image i's pixels all hold i (so a batch's images can be read back)."""

    name = "numbered"

    def load_split(self, split: str) -> LabelledImages:
        labels = torch.arange(10).repeat_interleave(7)
        images = torch.arange(70).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).to(torch.uint8).contiguous()
        return LabelledImages(images, labels, [f"class{c}" for c in range(10)])


def batches(family: NumberedImages, count: int, start: int = 0,
            seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(_EndlessExampleBatches(family, seed, start), count))


def numbers(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0, 0, 0] * 255).round().long().tolist()


def test_each_epoch_visits_every_example_once_in_a_new_order_with_its_class() -> None:
    family = NumberedImages()
    assert family.serve_examples(Pretraining(batch_size=8)) == 10  # the training classes
    stream = batches(family, 16)  # 70 // 8 = 8 batches an epoch, the last 6 examples dropped
    epochs = [[n for inputs, _ in stream[e * 8:(e + 1) * 8] for n in numbers(inputs)] for e in range(2)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 64
    assert epochs[0] != epochs[1]
    for inputs, labels in stream:
        assert labels.tolist() == [n // 7 for n in numbers(inputs)]


def test_the_example_stream_resumes_where_it_stopped_and_follows_the_seed() -> None:
    family = NumberedImages()
    family.serve_examples(Pretraining(batch_size=8))
    whole = batches(family, 20)
    resumed = batches(family, 7, start=13)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[13:], resumed, strict=True))
    assert numbers(batches(family, 1, seed=1)[0][0]) != numbers(whole[0][0])


def test_augmentation_crops_and_flips_each_image_and_follows_its_generator() -> None:
    family = NumberedImages()
    images = torch.rand(6, 3, 5, 5)
    augmented = family.augmented(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape
    padded = F.pad(images, (PAD,) * 4)
    for image, original in zip(augmented, padded, strict=True):  # each is one crop of its padded image, maybe flipped
        crops = [original[:, top:top + 5, left:left + 5] for top in range(2 * PAD + 1) for left in range(2 * PAD + 1)]
        assert any(torch.equal(image, crop) or torch.equal(image, crop.flip(-1)) for crop in crops)
    assert torch.equal(augmented, family.augmented(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(augmented, family.augmented(images, torch.Generator().manual_seed(1)))


def test_texts_have_no_augmentation_and_batches_larger_than_the_split_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm.augment=true: task wordnet's texts have no augmentation: set "
                                          r"algorithm.augment=false$"):
        WordNetGlosses(val_files=["noun.group"], test_files=["noun.food"]).serve_examples(
            Pretraining(batch_size=8, augment=True))
    with pytest.raises(ConfigError, match=r"^algorithm.batch_size=71 but the train split of numbered has only 70 "
                                          r"images: lower algorithm.batch_size$"):
        NumberedImages().serve_examples(Pretraining(batch_size=71))


def separable_task(ways: int = 3, shots: int = 5, queries: int = 4, seed: int = 0) -> tuple[Task, torch.Tensor]:
    """Features (not images) of ``ways`` well-separated classes, and the class means."""
    generator = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(ways, 16, generator=generator)
    support_y, query_y = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat_interleave(queries)
    support = means[support_y] + 0.3 * torch.randn(len(support_y), 16, generator=generator)
    query = means[query_y] + 0.3 * torch.randn(len(query_y), 16, generator=generator)
    return Task(support, support_y, query, query_y), means


class Features(nn.Module):
    """A model whose embedding is the identity on 16 features: heads are tested on known features."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Identity(), nn.Linear(16, 3)


def test_the_logistic_head_is_scikit_learns_regression_on_normalised_features() -> None:
    task, _ = separable_task()
    algorithm = FineTune(Features(), head="logistic", logistic_c=0.5)
    logits = algorithm.adapt(task, None)(task.query_x)
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(F.normalize(task.support_x, dim=1).double().numpy(),
                                                             task.support_y.numpy())
    expected = reference.predict_log_proba(F.normalize(task.query_x, dim=1).double().numpy())
    torch.testing.assert_close(logits, torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_the_logistic_head_of_two_classes_keeps_sklearns_probabilities() -> None:
    task, _ = separable_task(ways=2)
    logits = FineTune(Features()).adapt(task, None)(task.query_x)
    reference = LogisticRegression(max_iter=1000).fit(F.normalize(task.support_x, dim=1).double().numpy(),
                                                      task.support_y.numpy())
    expected = reference.predict_proba(F.normalize(task.query_x, dim=1).double().numpy())
    torch.testing.assert_close(logits.exp(), torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_sgd_heads_fit_the_support_set_repeatably_without_touching_the_global_random_stream(head: str) -> None:
    task, _ = separable_task()
    algorithm = FineTune(Features(), head=head, head_epochs=30)
    state = torch.random.get_rng_state()
    logits = algorithm.adapt(task, None)(task.query_x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (logits.argmax(1) == task.query_y).float().mean() == 1.0
    torch.testing.assert_close(logits, algorithm.adapt(task, None)(task.query_x), rtol=0, atol=0)


def test_an_untrained_head_does_not_fit_the_support_set() -> None:  # the fit above is the SGD's, not the init's
    task, _ = separable_task(seed=3)
    algorithm = FineTune(Features(), head="linear", head_epochs=1, head_lr=1e-6)
    assert (algorithm.adapt(task, None)(task.query_x).argmax(1) == task.query_y).float().mean() < 1.0


def test_the_cosine_classifier_scores_are_scale_times_learned_length_times_cosine() -> None:
    classifier = CosineClassifier(16, 3, scale=2.0)
    with torch.no_grad():  # weight norm: length g and direction v apart
        classifier.linear.parametrizations.weight.original0.copy_(torch.tensor([[1.0], [2.0], [0.5]]))
    x = torch.randn(4, 16)
    direction = classifier.linear.parametrizations.weight.original1
    expected = 2.0 * torch.tensor([1.0, 2.0, 0.5]) * F.cosine_similarity(x[:, None], direction[None], dim=-1)
    torch.testing.assert_close(classifier(x), expected)


def test_adaptation_leaves_the_embedding_frozen() -> None:
    model = CNN4(ways=5, channels=1, image_size=28, hidden_size=8)
    algorithm = FineTune(model, head="linear", head_epochs=2)
    algorithm.bind(classes=20)
    task = Task(torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2), torch.rand(5, 1, 28, 28), torch.arange(5))
    before = {name: p.clone() for name, p in algorithm.named_parameters()}
    logits = algorithm.adapt(task, None)(task.query_x)
    assert logits.shape == (5, 5) and not logits.requires_grad  # no graph back to the embedding
    assert all(torch.equal(p, before[name]) for name, p in algorithm.named_parameters())
    assert all(p.grad is None for p in algorithm.parameters())


def test_pretraining_classifies_all_training_classes_and_not_with_the_models_head() -> None:
    model = CNN4(ways=5, channels=1, image_size=28, hidden_size=8)
    algorithm = FineTune(model, pretrain_head="cosine")
    algorithm.bind(classes=40)
    logits, loss = algorithm.pretraining_loss(torch.rand(6, 1, 28, 28), torch.tensor([0, 5, 9, 39, 2, 2]))
    assert logits.shape == (6, 40) and loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor(
        [0, 5, 9, 39, 2, 2])).item())
    loss.backward()
    assert model.head.weight.grad is None
    assert algorithm.classifier.linear.parametrizations.weight.original1.grad is not None
    assert all(p.grad is not None for p in model.features.parameters())


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm.head must be logistic, linear or cosine, got 'svm'$"):
        FineTune(Features(), head="svm")
    with pytest.raises(ConfigError, match=r"^algorithm.pretrain_head must be linear or cosine, got 'logistic'$"):
        FineTune(Features(), pretrain_head="logistic")
    with pytest.raises(ConfigError, match=r"^algorithm.head_epochs must be >= 1, got 0$"):
        FineTune(Features(), head_epochs=0)
    with pytest.raises(ConfigError, match=r"^algorithm=finetune needs a model with an embedding \(model.features\) "
                                          r"and a linear head \(model.head\), and Sequential has not"):
        FineTune(nn.Sequential(nn.Linear(2, 2)))


def test_pretraining_needs_a_family_of_labelled_examples(job) -> None:
    job("algorithm=finetune")  # the job's Hydra context names the option in the message
    with pytest.raises(ConfigError, match=r"^algorithm=finetune pre-trains a classifier on the labelled examples of "
                                          r"one family's training classes, and task sinusoid has none to serve"):
        serve_examples(FineTune(Features()), SinusoidRegression())


def test_finetune_refuses_a_family_without_labelled_examples(job) -> None:
    with pytest.raises(ConfigError, match=r"^algorithm=finetune learns classification tasks only, and "
                                          r"task=sinusoid is regression"):
        train(job("algorithm=finetune", "debug=smoke"))


def test_pretraining_lowers_its_loss_and_the_run_records_it_with_the_fine_tuned_accuracy(job, tmp_path,
                                                                                         kanji_cache) -> None:
    metrics = train(job("algorithm=finetune", "task=kanji", f"task.cache_dir={kanji_cache}", "task.num_classes=300",
                        "model.hidden_size=32", "algorithm.batch_size=32", "trainer.max_steps=120",
                        "trainer.log_every_n_steps=10", "trainer.val_check_interval=1000", "task.val_tasks=20",
                        "task.test_tasks=100"))
    assert metrics["meta_test/post_acc"] > 0.5, metrics  # 5-way 1-shot: chance is 0.2
    assert "meta_test/pre_acc" not in metrics  # no head before the support set
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("kanji").experiment_id])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "pretrain/loss")]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.92 * sum(losses[:3]), losses  # ~4.96 → ~4.39
    assert run.data.params["algorithm.head"] == "logistic" and "pretrain/acc" in run.data.metrics
    assert "meta_train/loss" not in run.data.metrics


@pytest.mark.slow  # three processes, ~2 min on 2 cores
def test_a_resumed_pretraining_continues_the_example_stream_as_an_uninterrupted_run(tmp_path, kanji_cache) -> None:
    common = ["algorithm=finetune", "task=kanji", f"task.cache_dir={kanji_cache}", "task.num_classes=150",
              "task.max_alphabet_size=20", "model.hidden_size=16", "algorithm.batch_size=16",
              "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "task.val_tasks=10",
              "task.test_tasks=40", "runner.backend=loop", "seed=5"]
    reference_store, store = f"sqlite:///{tmp_path}/reference.db", f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "reference").mkdir()
    reference = run_cli([*common, "trainer.max_steps=40", f"tracking.tracking_uri={reference_store}"],
                        cwd=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    first = run_cli([*common, "trainer.max_steps=20", f"tracking.tracking_uri={store}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("kanji").experiment_id])
    resumed = run_cli([f"tracking.tracking_uri={store}", f"resume={run.info.run_id}", "trainer.max_steps=40"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "pretrain/loss")}
    reference_client = MlflowClient(reference_store)
    [uninterrupted] = reference_client.search_runs([reference_client.get_experiment_by_name("kanji").experiment_id])
    expected = {m.step: m.value for m in reference_client.get_metric_history(uninterrupted.info.run_id,
                                                                            "pretrain/loss")}
    assert sorted(losses) == list(range(40))
    assert losses == pytest.approx(expected, rel=1e-5)  # the same batches after the resume as without it
    assert client.get_run(run.info.run_id).data.metrics["meta_test/post_acc"] == pytest.approx(
        uninterrupted.data.metrics["meta_test/post_acc"], rel=1e-6)
