"""Few-shot text: WordNet's offline family, its tokeniser, the text encoders under every backend, and runs that
learn and are recorded like every other family's."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from metalab.algorithms import MAML
from metalab.compare import compare
from metalab.errors import ConfigError, DataMissingError
from metalab.job import train
from metalab.models import TextCNN, TextTransformer
from metalab.tasks import Episodes, WordNetGlosses
from metalab.tasks.classification import SPLITS
from metalab.tasks.texts import train_tokenizer
from tests.conftest import compose_job
from tests.test_backends import meta_gradient

REPOSITORY = Path(__file__).resolve().parents[1]
SMALL_MODEL = ("model.embedding_size=32", "model.filters=32", "task.vocab_size=2000")


@pytest.fixture(scope="module")
def wordnet() -> WordNetGlosses:
    return instantiate(compose_job(Path("unused"), ["task=wordnet"]).task)


def test_wordnet_classes_are_split_by_lexicographer_file_and_every_gloss_is_in_one_class(wordnet) -> None:
    groups = {split: Counter(name.split("/")[0] for name in wordnet.read_texts(split).class_names) for split in SPLITS}
    assert set(groups["val"]) == set(wordnet.val_files) and set(groups["test"]) == set(wordnet.test_files)
    assert not set(groups["train"]) & (set(groups["val"]) | set(groups["test"]))
    assert sum(len(counts) for counts in groups.values()) > 30  # lexicographer files with classes
    texts = [text for split in SPLITS for text in wordnet.read_texts(split).texts]
    assert len(texts) == len(set(texts))
    for split in SPLITS:
        counts = Counter(wordnet.read_texts(split).labels)
        assert min(counts.values()) >= wordnet.min_examples
        assert len(counts) == len(wordnet.read_texts(split).class_names)
    assert sum(len(wordnet.read_texts(split).class_names) for split in SPLITS) == 670  # the defaults' classes


def test_the_tokeniser_is_learnt_from_the_training_split_alone(wordnet) -> None:
    train_only = train_tokenizer(wordnet.read_texts("train").texts, wordnet.vocab_size, wordnet.lowercase)
    assert wordnet.tokenizer.get_vocab() == train_only.get_vocab()
    every_split = train_tokenizer([text for split in SPLITS for text in wordnet.read_texts(split).texts],
                                  wordnet.vocab_size, wordnet.lowercase)
    assert every_split.get_vocab() != train_only.get_vocab()  # test glosses would have changed the vocabulary


def test_text_episodes_are_token_ids_with_a_mask_of_the_real_tokens(wordnet) -> None:
    episodes = wordnet.sample(3, torch.Generator().manual_seed(0), "test")
    ways, shots, queries, length = wordnet.ways, wordnet.shots, wordnet.queries, wordnet.max_length
    assert episodes.support_x["ids"].shape == (3, ways * shots, length)
    assert episodes.query_x["ids"].shape == (3, ways * queries, length)
    assert torch.equal(episodes.support_x["mask"], episodes.support_x["ids"] != 0)
    assert torch.equal(episodes.support_y[0], torch.arange(ways).repeat_interleave(shots))
    pieces = wordnet.tokenizer.decode(episodes.support_x["ids"][0, 0].tolist()).replace(" ", "")
    glosses = {text.lower().replace(" ", "") for text in wordnet.read_texts("test").texts}
    assert any(gloss.startswith(pieces) for gloss in glosses)  # a real test gloss, cut at max_length


def test_the_data_digest_is_the_same_in_every_process_and_changes_with_the_split(wordnet) -> None:
    """The tokeniser learnt, and so every token id, is the same in every process (see ``train_tokenizer``)."""
    script = ("from tests.conftest import compose_job; from hydra.utils import instantiate; from pathlib import Path; "
              "import sys; family = instantiate(compose_job(Path('unused'), ['task=wordnet', *sys.argv[1:]]).task); "
              "print(family.data_description()['digest'])")

    def digest(*overrides: str) -> str:
        return subprocess.run([sys.executable, "-c", script, *overrides], capture_output=True, text=True, check=True,
                              cwd=REPOSITORY).stdout.strip()

    assert digest() == digest() == wordnet.data_description()["digest"]
    other_split = WordNetGlosses(val_files=wordnet.val_files, test_files=wordnet.test_files[:-1])
    assert other_split.data_description()["digest"] != wordnet.data_description()["digest"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"val_files": ["noun.bogus"]}, r"^task.val_files: noun.bogus holds no class \(lexicographer files with classes: "
                                    r"noun.Tops, noun.act, "),
    ({"val_files": ["noun.animal"], "test_files": ["noun.animal"]},
     r"^task.val_files and task.test_files share noun.animal: a lexicographer file goes to one split$"),
    ({"parts_of_speech": ["adjective"]}, r"^task.parts_of_speech must be some of noun, verb, got \['adjective'\]$"),
    ({"shots": 20, "queries": 20}, r"^task.shots \+ task.queries = 40 but a train class of wordnet has only 20 texts: "
                                   r"lower task.shots or task.queries$"),
])
def test_bad_wordnet_settings_are_one_line_naming_the_key(overrides: dict, message: str) -> None:
    settings = {"val_files": ["noun.group"], "test_files": ["noun.food"]} | overrides
    with pytest.raises(ConfigError, match=message):
        WordNetGlosses(**settings).prepare()


def test_a_folder_without_wordnet_is_data_missing(tmp_path: Path) -> None:
    family = WordNetGlosses(root=str(tmp_path), val_files=["noun.group"], test_files=["noun.animal"])
    with pytest.raises(DataMissingError, match=rf"^task.root={tmp_path} holds no WordNet 3.0 database \(data.noun, "
                                               r"data.verb, lexnames\): point it at WordNet's dict folder"):
        family.prepare()


def text_tasks(count: int = 3, ways: int = 3, shots: int = 2, queries: int = 3, length: int = 12) -> Episodes:
    """Random token ids, each text with its own number of real tokens (the rest padding, id 0)."""
    generator = torch.Generator().manual_seed(0)

    def texts(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 50, (count, n, length), generator=generator)
        mask = torch.arange(length) < torch.randint(1, length + 1, (count, n, 1), generator=generator)
        return {"ids": ids.masked_fill(~mask, 0), "mask": mask}

    return Episodes(texts(ways * shots), torch.arange(ways).repeat_interleave(shots).expand(count, -1),
                    texts(ways * queries), torch.arange(ways).repeat_interleave(queries).expand(count, -1))


@pytest.mark.parametrize("encoder", ["text_cnn", "transformer"])
def test_maml_on_each_text_encoder_gives_the_loops_meta_gradient_under_vmap(encoder: str) -> None:
    torch.manual_seed(0)
    model = (TextCNN(3, 50, embedding_size=8, filters=4) if encoder == "text_cnn"
             else TextTransformer(3, 50, max_length=12, width=8, layers=2, heads=2)).double()
    loop_gradient, loop_loss = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2), text_tasks(),
                                             "classification", "loop")
    gradient, loss = meta_gradient(MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2), text_tasks(),
                                   "classification", "vmap")
    torch.testing.assert_close(loss, loop_loss, rtol=1e-6, atol=1e-10)
    for got, expected in zip(gradient, loop_gradient, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in gradient[:1])  # the embeddings learn


@pytest.mark.parametrize("encoder", ["text_cnn", "transformer"])
def test_padding_does_not_change_a_texts_features(encoder: str) -> None:
    torch.manual_seed(0)
    model = (TextCNN(3, 50, embedding_size=8, filters=4) if encoder == "text_cnn"
             else TextTransformer(3, 50, max_length=20, width=8, layers=2, heads=2))
    ids = torch.randint(1, 50, (1, 7))
    short = model.features({"ids": ids, "mask": torch.ones(1, 7, dtype=torch.bool)})
    padded = torch.cat([ids, torch.full((1, 13), 0)], dim=1)
    mask = torch.arange(20) < 7
    padded_ids = torch.where(mask, padded, torch.randint(1, 50, (1, 20)))  # whatever the padding's ids
    torch.testing.assert_close(model.features({"ids": padded_ids, "mask": mask.unsqueeze(0)}), short)


def test_protonet_learns_wordnet_well_above_chance_and_mlflow_records_the_run(job, tmp_path: Path) -> None:
    result = train(job("task=wordnet", "algorithm=protonet", "trainer.max_steps=60", "task.val_tasks=20",
                       "task.test_tasks=100", "runner.backend=loop", *SMALL_MODEL))
    assert result["meta_test/post_acc"] > 0.4  # 5-way: chance is 0.2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("wordnet").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["task._target_"] == "metalab.tasks.WordNetGlosses"
    assert run.data.params["model._target_"] == "metalab.models.TextCNN"
    assert run.data.metrics["meta_test/post_acc"] == pytest.approx(result["meta_test/post_acc"])
    [data] = run.inputs.dataset_inputs
    assert data.dataset.name == "wordnet" and data.dataset.digest


@pytest.mark.parametrize(("algorithm", "overrides"), [
    pytest.param("fomaml", ["algorithm.inner_lr=0.4", "algorithm.inner_steps=5"], id="fomaml",
                 marks=pytest.mark.slow),  # ~29 s; `make test` keeps ProtoNet's wordnet run
    pytest.param("maml", ["algorithm.inner_lr=0.4", "algorithm.inner_steps=3"], id="maml", marks=pytest.mark.slow),
    pytest.param("protomaml", [], id="protomaml", marks=pytest.mark.slow),
    pytest.param("protonet", ["model=transformer"], id="protonet-transformer", marks=pytest.mark.slow),
    pytest.param("finetune", ["algorithm.batch_size=32"], id="finetune"),  # pre-train on glosses, logistic head
    pytest.param("finetune", ["algorithm.batch_size=32", "algorithm.pretrain_head=cosine", "algorithm.head=cosine"],
                 id="finetune-baseline++", marks=pytest.mark.slow),
    pytest.param("metaoptnet", [], id="metaoptnet", marks=pytest.mark.slow),
    pytest.param("r2d2", [], id="r2d2", marks=pytest.mark.slow),
])
def test_algorithms_learn_wordnet_unchanged(job, algorithm: str, overrides: list[str]) -> None:
    small = [setting for setting in SMALL_MODEL if "model=transformer" not in overrides or "task." in setting]
    result = train(job("task=wordnet", f"algorithm={algorithm}", *overrides, "trainer.max_steps=100",
                       "task.val_tasks=20", "task.test_tasks=100", "runner.backend=loop", *small))
    assert result["meta_test/post_acc"] > 0.3  # 5-way: chance is 0.2


def test_compare_puts_text_and_image_families_in_one_table(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    accuracies_by_task = {"kanji": {"maml": 0.9, "protonet": 0.95}, "wordnet": {"maml": 0.5, "protonet": 0.6}}
    for task, accuracies in accuracies_by_task.items():
        experiment = client.create_experiment(task)
        for algorithm, accuracy in accuracies.items():
            run = client.create_run(experiment, tags={"metalab.algorithm": algorithm, "metalab.task": task})
            client.log_metric(run.info.run_id, "meta_test/post_acc", accuracy, step=1)
            client.set_terminated(run.info.run_id)
    result = compare(uri, out=tmp_path / "report")
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| maml | 0.9000 (n=1) | 0.5000 (n=1) |" in table and table.count("| kanji | wordnet |") == 1
    cells = result.table.set_index(["row", "column"])["mean"]
    assert cells["protonet", "wordnet"] == pytest.approx(0.6) and cells["maml", "kanji"] == pytest.approx(0.9)


def test_meta_dataset_episodes_of_texts_vary_in_ways_and_protonet_learns_from_them(job) -> None:
    family = WordNetGlosses(val_files=["noun.group"], test_files=["noun.food"], sampler="meta_dataset",
                            meta_dataset={"max_ways": 12, "max_support": 60})
    episodes = family.sample(6, torch.Generator().manual_seed(0), "train")
    assert not episodes.stacked  # ragged: each task its own ways and shots
    ways = {int(task.query_y.max()) + 1 for task in episodes}
    assert len(ways) > 1 and all(5 <= way <= 12 for way in ways)
    assert all(task.support_x["ids"].shape == task.support_x["mask"].shape for task in episodes)
    result = train(job("task=wordnet", "algorithm=protonet", "task.sampler=meta_dataset",
                       "task.meta_dataset={max_ways: 10, max_support: 50}", "trainer.max_steps=40", "task.val_tasks=10",
                       "task.test_tasks=30", "runner.backend=loop", *SMALL_MODEL))
    assert result["meta_test/post_acc"] > 0.3  # 5 to 10 ways: chance is at most 0.2
