from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vbon.errors import ConfigError
from vbon.rewards import load_reward
from vbon.rewards.base import RewardModel
from vbon.rewards.hf_classifier import pick_label


def test_vader_orders_sentiment_and_implements_interface() -> None:
    r = load_reward("vader")
    assert isinstance(r, RewardModel)
    pos, neu, neg = r.score(
        ["p"] * 3,
        [
            "A wonderful, moving, brilliant film.",
            "The film is 90 minutes long.",
            "Awful, boring and painful to watch.",
        ],
    )
    assert pos > 0.5 > neu > -0.5 > neg
    assert neg >= -1.0 and pos <= 1.0


def test_vader_scores_the_completion_not_the_prompt() -> None:
    r = load_reward("vader")
    a, b = r.score(["I hated it, terrible", "I loved it, wonderful"], ["It was okay."] * 2)
    assert a == b


def test_score_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="one prompt per completion"):
        load_reward("vader").score(["a", "b"], ["x"])


@pytest.mark.parametrize("spec", ["vaderr", "sentiment", "roberta"])
def test_unknown_backend_names_the_options(spec: str) -> None:
    with pytest.raises(ConfigError, match="unknown reward backend .*vader"):
        load_reward(spec)


def test_missing_classifier_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward(f"hf:{tmp_path / 'nope'}")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="no config.json"):
        load_reward(str(tmp_path))


def test_hf_classifier_scores_positive_logit_in_batches(tiny_classifier: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["good", "a much longer completion about a film " * 3, "bad", "ok then"]
    r = load_reward(str(tiny_classifier), batch_size=2)
    assert r.describe()["label_index"] == 1  # "POSITIVE" picked by name
    got = r.score(["p"] * len(texts), texts)
    # Same numbers as an unbatched forward pass of the same model, one text at a time.
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.inference_mode():
        want = [model(**tok(t, return_tensors="pt")).logits[0, 1].item() for t in texts]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == len(got)


def test_hf_classifier_truncates_inputs_longer_than_its_context(tiny_classifier: Path) -> None:
    r = load_reward(str(tiny_classifier))
    assert r.describe()["max_length"] == 64
    long = "word " * 5000
    (score,) = r.score(["p"], [long])
    assert isinstance(score, float)


def test_hf_classifier_scores_an_empty_completion(tiny_classifier: Path) -> None:
    # (An empty text has no tokens with this tokenizer: a forward on it fails.) It scores as a
    # space, as the remote reward sends it, alone and inside a batch.
    r = load_reward(str(tiny_classifier))
    (alone,) = r.score(["p"], [""])
    assert alone == pytest.approx(r.score(["p"], [" "])[0])
    assert r.score(["p", "p"], ["", "good"])[0] == pytest.approx(alone, abs=1e-4)


def test_hf_classifier_label_choice(tiny_classifier: Path) -> None:
    neg = load_reward(str(tiny_classifier), label="negative")
    pos = load_reward(str(tiny_classifier), label=1)
    assert neg.describe()["label_index"] == 0 and pos.describe()["label_index"] == 1
    a = neg.score(["p"], ["fine"])[0]
    b = pos.score(["p"], ["fine"])[0]
    assert a != b
    with pytest.raises(ConfigError, match="out of range"):
        load_reward(str(tiny_classifier), label=5)
    with pytest.raises(ConfigError, match="not one of the classifier's labels"):
        load_reward(str(tiny_classifier), label="neutral")


def test_pick_label_defaults() -> None:
    assert pick_label({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, 3, None) == 2
    assert pick_label({0: "pos", 1: "neg"}, 2, None) == 0
    assert pick_label({0: "LABEL_0"}, 1, None) == 0


def test_corrupted_classifier_weights(tiny_classifier: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_classifier, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot load a sequence classifier"):
        load_reward(str(broken))
