"""Metrics on hand-made predictions (exact), against scikit-learn, and through a classifier callable."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score
from test_train_standins import LinearHead, clustered_features, tiny_prompt

from vlprompt.errors import ConfigError, DatasetError
from vlprompt.evaluation.metrics import evaluate, metrics_from_predictions, predict, predict_topk

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["cat", "dog", "fox"]


def _one_hot_logits(predictions: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 5.0


def test_metrics_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    metrics = metrics_from_predictions(preds, labels, NAMES)
    assert metrics["num_samples"] == 8
    assert metrics["accuracy"] == 75.0
    assert metrics["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert metrics["per_class_accuracy"] == {"cat": 75.0, "dog": 50.0, "fox": 100.0}
    # F1 per class = 2TP / (2TP + FP + FN): cat 6/7, dog 2/4, fox 4/5
    assert metrics["macro_f1"] == pytest.approx(100 * (6 / 7 + 0.5 + 0.8) / 3, abs=1e-12)


def test_repeated_class_names_keep_separate_per_class_entries():
    # ImageNet has two "crane" classes (a bird and a machine): both must be reported
    metrics = metrics_from_predictions(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]),
                                       ["crane", "kite", "crane"])
    assert metrics["per_class_accuracy"] == {"crane (0)": 100.0, "kite": 50.0, "crane (2)": 100.0}


def test_macro_f1_matches_sklearn_including_absent_classes():
    generator = torch.Generator().manual_seed(0)
    names = [f"c{i}" for i in range(7)]
    for trial in range(5):
        labels = torch.randint(0, 5, (60,), generator=generator)  # classes 5 and 6 never occur as labels
        preds = torch.randint(0, 6 if trial % 2 else 5, (60,), generator=generator)  # class 5 sometimes predicted
        metrics = metrics_from_predictions(preds, labels, names)
        expected = 100 * f1_score(labels.numpy(), preds.numpy(), average="macro", zero_division=0)
        assert metrics["macro_f1"] == pytest.approx(expected, abs=1e-9)
        assert metrics["confusion_matrix"] == confusion_matrix(labels.numpy(), preds.numpy(), labels=range(7)).tolist()
        assert metrics["per_class_accuracy"]["c6"] is None  # no samples: undefined, not 0


def test_evaluate_with_a_classifier_callable():
    labels = torch.tensor([0, 1, 2, 2, 1])
    logits = _one_hot_logits([0, 1, 1, 2, 1])
    calls = []

    def classifier(features):
        calls.append(features.shape[0])
        return features  # features are the logits here

    metrics = evaluate(classifier, logits, labels, NAMES, batch_size=2)
    assert calls == [2, 2, 1]
    assert metrics["accuracy"] == 80.0
    assert metrics["per_class_accuracy"] == {"cat": 100.0, "dog": 100.0, "fox": 50.0}
    assert predict(classifier, logits, 3).tolist() == [0, 1, 1, 2, 1]


def test_text_side_is_computed_once_per_evaluation():
    method = tiny_prompt(num_classes=5)
    feats = clustered_features(num_classes=5, per_class=6)
    before = method.text_encodings
    metrics = evaluate(method.classifier(), feats.features, feats.labels, method.classnames, batch_size=7)
    assert method.text_encodings == before + 1  # 30 samples in 5 batches, one text encoding
    assert metrics["num_samples"] == 30
    # the result equals the training path's argmax
    with torch.no_grad():
        expected = method(feats.features).argmax(1)
    assert metrics["accuracy"] == 100 * int((expected == feats.labels).sum()) / 30


def test_bf16_evaluation_agrees_with_fp32_on_clear_cases():
    head = LinearHead(64, 5)
    feats = clustered_features(num_classes=5, per_class=4)
    with torch.no_grad():
        head.weight.copy_(torch.stack([feats.features[feats.labels == k].mean(0) for k in range(5)]))
    fp32 = evaluate(head.classifier(), feats.features, feats.labels, head.classnames)
    bf16 = evaluate(head.classifier(), feats.features, feats.labels, head.classnames, precision="bf16")
    assert fp32["accuracy"] == 100.0 and bf16["accuracy"] == 100.0


def test_predict_topk():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    top = predict_topk(lambda f: f, logits, NAMES, k=2)
    probs = logits.softmax(1)
    assert [[name for name, _ in row] for row in top] == [["cat", "fox"], ["dog", "cat"]]
    assert top[0][0][1] == pytest.approx(probs[0, 0].item(), abs=1e-7)
    assert top[0][1][1] == pytest.approx(probs[0, 2].item(), abs=1e-7)
    assert len(predict_topk(lambda f: f, logits, NAMES, k=10)[0]) == 3  # k is capped at the number of classes
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        predict_topk(lambda f: f, logits, NAMES, k=0)


def test_bad_input_is_reported():
    logits = _one_hot_logits([0, 1])
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 3\).*got range \[0, 5\]"):
        evaluate(lambda f: f, logits, torch.tensor([0, 5]), NAMES)
    with pytest.raises(DatasetError, match="2 feature rows but 3 labels"):
        evaluate(lambda f: f, logits, torch.tensor([0, 1, 2]), NAMES)
    with pytest.raises(ConfigError, match=r"logits of shape \(2, 3\) for 4 class names"):
        evaluate(lambda f: f, logits, torch.tensor([0, 1]), NAMES + ["owl"])
    with pytest.raises(DatasetError, match="empty"):
        evaluate(lambda f: f, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), NAMES)
    with pytest.raises(DatasetError, match=r"float tensor \[N, D\]"):
        evaluate(lambda f: f, torch.zeros(2, 3, 4, 5), torch.tensor([0, 1]), NAMES)
    with pytest.raises(DatasetError, match="3 feature rows but 2 labels"):  # views [V, N, D]: N = 3
        evaluate(lambda f: f[0], torch.zeros(2, 3, 3), torch.tensor([0, 1]), NAMES)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        evaluate(lambda f: f, logits, torch.tensor([0, 1]), NAMES, batch_size=0)
