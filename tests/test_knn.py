"""`imagenet-trainer knn`: DINO's weighted k-NN against a brute-force reference (a loop over the
test points, a full sort of each one's similarities), with exact ties between classes, the
normalisation, chunking, and the verb on a real dump (torch.save'd files)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.artifacts.knn import knn_accuracy, knn_topk
from trainer.cli import main as cli

T = 0.07


def reference(train, train_labels, test, k, temperature=T, num_classes=None):
    """Each test point's five best classes, by the definition: cosine to every training point, the
    k largest by a full sort, votes exp(cos / T) summed per class in float64, every class ranked by
    votes then index."""
    num_classes = num_classes or int(train_labels.max()) + 1
    rows = [[float(v) for v in r] for r in train]
    unit = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]
    out = []
    for point in test.tolist():
        norm = math.sqrt(sum(x * x for x in point))
        sims = [sum(a * b / norm for a, b in zip(point, u)) for u in unit]
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(train_labels[j])] += math.exp(sims[j] / temperature)
        out.append(sorted(range(num_classes), key=lambda c: (-votes[c], c))[:5])
    return torch.tensor(out, dtype=torch.int64)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(240, 12, generator=g) * torch.rand(240, 1, generator=g) * 5  # norms vary
    train_labels = torch.randint(0, 9, (240,), generator=g)
    test = torch.randn(40, 12, generator=g)
    test_labels = torch.randint(0, 9, (40,), generator=g)
    return train, train_labels, test, test_labels


def test_the_ranked_classes_are_the_brute_force_ones_for_every_k(data):
    train, train_labels, test, _ = data
    ks = (1, 3, 10, 20, 240, 500)  # 500 > the 240 training points: every point votes
    got = knn_topk(train, train_labels, test, ks=ks, temperature=T)
    assert sorted(got) == sorted(ks)
    for k in ks:
        assert torch.equal(got[k], reference(train, train_labels, test, k)), k
    assert got[1].shape == (40, 5)


def test_accuracy_counts_the_label_in_the_first_one_and_the_first_five(data):
    train, train_labels, test, test_labels = data
    got = knn_accuracy(train, train_labels, test, test_labels, ks=(10, 20), temperature=T)
    for k in (10, 20):
        ref = reference(train, train_labels, test, k)
        top1 = (ref[:, 0] == test_labels).double().mean().item()
        top5 = (ref[:, :5] == test_labels[:, None]).any(1).double().mean().item()
        assert got[k] == {"top1": pytest.approx(top1), "top5": pytest.approx(top5)}
        assert 0 < top1 < top5 < 1  # neither trivial: both parts of the comparison can fail


def test_classes_with_equal_votes_rank_by_index_not_by_the_order_of_the_training_points():
    e = torch.eye(7)
    # Two identical points (cosine exactly 1 to the test point) of classes 3 then 1, a third of class 0
    # at cosine 0.6, and one of class 2 at cosine 0: the votes of 3 and 1 are exactly equal. Classes
    # 4, 5, 6 get no vote: they rank last, by index, as every class does in DINO's ranking.
    train = torch.stack([e[0], e[0], 0.6 * e[0] + 0.8 * e[1], e[2]])
    labels = torch.tensor([3, 1, 0, 2])
    test = e[0:1] * 3.0
    got = knn_topk(train, labels, test, ks=(2, 3, 4), temperature=T, num_classes=7)
    assert got[2].tolist() == [[1, 3, 0, 2, 4]]
    assert got[3].tolist() == [[1, 3, 0, 2, 4]]
    assert got[4].tolist() == [[1, 3, 0, 2, 4]]
    for k in (2, 3, 4):
        assert torch.equal(got[k], reference(train, labels, test, k, num_classes=7))
    # A tie for the first place: top-1 counts class 1 only. Top-5 counts the first k classes when
    # k < 5 (DINO's min(5, k)): with k=2, class 0 (third) is not a hit, with k=3 it is.
    both = torch.cat([test, test, test])
    assert knn_accuracy(train, labels, both, torch.tensor([1, 3, 0]), ks=(2,), num_classes=7)[2] == \
        {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    assert knn_accuracy(train, labels, both, torch.tensor([1, 3, 0]), ks=(3,), num_classes=7)[3] == \
        {"top1": pytest.approx(1 / 3), "top5": 1.0}


def test_features_are_l2_normalised_so_the_norm_of_a_point_does_not_pull_votes():
    # Raw dot products would pick the long vector (class 0): 10 > 1. By cosine, the short one is nearer.
    train = torch.tensor([[10.0, 10.0], [1.0, 0.1]])
    labels = torch.tensor([0, 1])
    assert knn_topk(train, labels, torch.tensor([[1.0, 0.0]]), ks=(1,))[1][0, 0].item() == 1
    # And scaling any row, train or test, changes nothing.
    g = torch.Generator().manual_seed(1)
    train, labels = torch.randn(50, 6, generator=g), torch.randint(0, 4, (50,), generator=g)
    test = torch.randn(9, 6, generator=g)
    scaled = knn_topk(train * torch.rand(50, 1, generator=g) * 100, labels, test * 1e-3, ks=(5,))
    assert torch.equal(scaled[5], knn_topk(train, labels, test, ks=(5,))[5])


def test_chunks_of_test_points_give_the_answer_of_one_chunk(data):
    train, train_labels, test, _ = data
    whole = knn_topk(train, train_labels, test, ks=(10, 20), chunk_size=len(test))
    for chunk in (1, 7, 39):
        parts = knn_topk(train, train_labels, test, ks=(10, 20), chunk_size=chunk)
        assert all(torch.equal(parts[k], whole[k]) for k in (10, 20)), chunk


def test_bad_arguments_are_refused_by_name(data):
    train, train_labels, test, _ = data
    with pytest.raises(ValueError, match="temperature=0"):
        knn_topk(train, train_labels, test, temperature=0)
    with pytest.raises(ValueError, match="each k must be at least 1"):
        knn_topk(train, train_labels, test, ks=(0,))
    with pytest.raises(ValueError, match=r"train \(240, 12\), test \(40, 5\)"):
        knn_topk(train, train_labels, test[:, :5])


def _dump(folder, train, train_labels, test, test_labels):
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("trainfeat.pth", train), ("trainlabels.pth", train_labels), ("testfeat.pth", test),
                        ("testlabels.pth", test_labels)):
        torch.save(value, folder / name)
    return folder


def test_the_verb_reads_dinos_dump_and_prints_a_table_and_json(data, tmp_path, capsys):
    train, train_labels, test, test_labels = data
    folder = _dump(tmp_path / "feats", *data)
    assert cli(["knn", str(folder), "--k", "10", "20", "--json", "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = knn_accuracy(train, train_labels, test, test_labels, ks=(10, 20))
    assert [r["k"] for r in result["results"]] == [10, 20]
    for row in result["results"]:
        assert {"top1": row["top1"], "top5": row["top5"]} == pytest.approx(expected[row["k"]])
    assert (result["train"], result["test"], result["dim"], result["num_classes"]) == (240, 40, 12, 9)

    assert cli(["knn", str(folder), "--k", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"kNN on {folder}: 240 train and 40 test features of 12 dims, 9 classes, T=0.07")
    assert lines[1].split() == ["k", "top-1", "top-5"]
    assert lines[2].split() == ["10", f"{100 * expected[10]['top1']:.2f}", f"{100 * expected[10]['top5']:.2f}"]


def test_the_verb_names_a_missing_or_malformed_file(data, tmp_path, capsys):
    folder = _dump(tmp_path / "feats", *data)
    (folder / "testlabels.pth").unlink()
    assert cli(["knn", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet-trainer knn: ") and "testlabels.pth is missing" in err
    torch.save(data[3][:-1], folder / "testlabels.pth")  # one label short
    assert cli(["knn", str(folder)]) == 2
    assert "testlabels.pth: expected 40 integer labels" in capsys.readouterr().err
