"""VRFT-Aug's classification task (METHOD.md section 10): rewards, metrics, prompt, data, a run."""
import json
import os

import numpy as np
import pytest

import eval as ev
import start
import train
from config import load_config, parse_args
from data import DataError, SYNTH_LABELS, Labels, load_class_dataset
from prepare import from_npz
from tasks import SFT_REASONING, Classification, class_metrics, class_query
from reward import mfrs, parse_class, recitation, score_classes

NAMES = ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"]


def test_grades_score_by_their_distance_with_the_documented_decay():
    assert [mfrs(p, 2, 0.25) for p in (2, 3, 0, None)] == [1.0, 0.25, 0.0625, 0.0]
    assert mfrs(4, 0, 0.5) == 0.5 ** 4


def test_one_answer_only_an_or_hack_scores_nothing():
    assert parse_class("<answer> Grade 3. </answer>", NAMES) == 3
    for hack in ("<answer>grade 2 or grade 3</answer>", "<answer>grade 2, grade 3</answer>", "<answer>3</answer>"):
        assert parse_class(hack, NAMES) is None
    s = score_classes(["<answer>grade 2 or grade 3</answer>", "<answer>grade 3</answer>"], [3, 3], NAMES)
    assert s["acc"].tolist() == [0.0, 1.0] and s["fmt"].tolist() == [0.0, 1.0] and s["parse_fail"].tolist() == [1, 0]


def test_recitation_is_clipped_ngram_precision_and_its_sign_is_the_weight():
    # unigrams: dark, irregular, border found, the second "dark" not (one in the text): 3/4;
    # bigrams: "dark irregular", "irregular border" found, "border dark" not: 2/3
    assert recitation("Dark irregular border dark", "a dark irregular border") == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert recitation("", "anything") == 0.0
    text = "<think>dark irregular border dark</think><answer>grade 1</answer>"
    for delta in (0.5, -0.5):
        s = score_classes([text], [1], NAMES, template="r1", w_fmt=1.0, recite_weight=delta,
                          knowledge="a dark irregular border")
        assert s["reward"].item() == pytest.approx(1.0 + 1.0 + delta * (3 / 4 + 2 / 3) / 2)
    fuzzy = score_classes(["<answer>grade 3</answer>"], [1], NAMES, w_fmt=0.0, mfrs_weight=2.0)
    assert fuzzy["reward"].item() == pytest.approx(2.0 * 0.0625)  # wrong class: 0 + gamma * 0.25 ** 2


def test_metrics_by_hand():
    labels = Labels(["a", "b", "c"], ["", "", ""], ordinal=True)
    m = class_metrics([0, 1, 2], [0, 2, 2], labels)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)  # F1 per class: 1, 0, 2*1/(2+1)
    assert m["qwk"] == pytest.approx(1 - 0.25 / 1.25)  # observed weight 1/4; expected 3.75 / 3
    assert m["mae"] == pytest.approx(1 / 3) and m["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    unparsed = class_metrics([0, 2, 2], [None, None, 2], labels)  # counted as the farthest grade
    assert unparsed["mae"] == pytest.approx(4 / 3) and unparsed["parse_fail"] == pytest.approx(2 / 3)
    assert unparsed["unparsed"] == [1, 0, 1] and unparsed["confusion"] == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert m["unparsed"] == [0, 0, 0]


def test_the_knowledge_prompt():
    labels = Labels(["nevus", "melanoma"], ["round brown spot", "dark irregular patch"])
    assert class_query("What is it?", labels, False) == "What is it?\nOptions: nevus, melanoma."
    assert class_query("What is it?", labels, True) == ("What is it?\nnevus: round brown spot.\n"
                                                       "melanoma: dark irregular patch.\nOptions: nevus, melanoma.")


def test_sft_targets_with_the_knowledge_recite_it_every_other_sample():
    """So that the warm-started policy does both and R_recite has something to choose between."""
    for kind in ("grade", "type"):
        labels = SYNTH_LABELS[kind]
        task = Classification(labels, True, "r1")
        known = " ".join(labels.descriptions)
        said = [task.sft_reasoning(1, i) for i in range(4)]
        assert said[0] == said[2] == SFT_REASONING and said[1] == said[3] == labels.descriptions[1] + "."
        assert [recitation(t, known) for t in said] == [0.0, 1.0, 0.0, 1.0]
        assert {Classification(labels, False, "r1").sft_reasoning(1, i) for i in range(4)} == {SFT_REASONING}


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (6, 1))
    np.savez(tmp_path / "set.npz", train_images=images, train_labels=labels, test_images=images[:2],
             test_labels=labels[:2])
    path = from_npz(str(tmp_path / "set.npz"), str(tmp_path / "out"), ["a", "b", "c"], "train", ordinal=True)
    samples, read = load_class_dataset(path, str(tmp_path / "out" / "labels.json"))
    assert read.names == ["a", "b", "c"] and read.ordinal
    assert [s.label for s in samples] == labels[:, 0].tolist()
    assert all(np.array_equal(np.asarray(s.image()), im) for s, im in zip(samples, images))
    with pytest.raises(DataError, match=r"--names 'a,a': at least two distinct"):
        from_npz(str(tmp_path / "set.npz"), str(tmp_path / "o3"), ["a", "a"])
    with pytest.raises(DataError, match=r"labels run 0\.\.2, but 2 names were given"):
        from_npz(str(tmp_path / "set.npz"), str(tmp_path / "o2"), ["a", "b"])


def test_npz_arrays_other_than_medmnist_s_are_named_not_converted(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    cases = {"float": (pixels / 255.0, [0, 1, 0], r"train_images \(3, 28, 28\) float64: expected uint8 pixels"),
             "multi": (pixels, [[0, 1], [1, 0], [1, 1]], r"train_labels \(3, 2\): one class per image expected"),
             "short": (pixels, [0, 1], r"train_images \(3, 28, 28\) uint8 and train_labels \(2,\): one label per"),
             "fractional": (pixels, [0.0, 0.5, 1.0], "train_labels are float64: integer class indices expected")}
    for name, (images, labels, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", train_images=images, train_labels=np.array(labels))
        with pytest.raises(DataError, match=message):
            from_npz(str(tmp_path / f"{name}.npz"), str(tmp_path / name), ["a", "b"])
    with pytest.raises(DataError, match=r"float.npz: no array val_images \(it holds train_images, train_labels\)"):
        from_npz(str(tmp_path / "float.npz"), str(tmp_path / "v"), ["a", "b"], split="val")
    np.savez(tmp_path / "grey.npz", train_images=pixels[..., None], train_labels=np.array([[1], [0], [1]]))
    samples, _ = load_class_dataset(from_npz(str(tmp_path / "grey.npz"), str(tmp_path / "g"), ["a", "b"]),
                                    str(tmp_path / "g" / "labels.json"))
    assert np.array_equal(np.asarray(samples[2].image())[..., 1], pixels[2])


def test_a_converted_set_trains_says_it_has_no_test_split_and_evaluates_from_its_file(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "set.npz", train_images=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
             train_labels=np.array([0, 1, 0, 1]), test_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
             test_labels=np.array([1, 0]))
    out = str(tmp_path / "set")
    for split in ("train", "test"):
        from_npz(str(tmp_path / "set.npz"), out, ["benign", "malignant"], split)
    run = str(tmp_path / "run")
    train.main(["--task", "classify", "--dataset", f"{out}/train.jsonl", "--labels", f"{out}/labels.json",
                "--algo", "sft", "--steps", "1", "--batch-prompts", "2", "--threads", "1", "--out", run])
    assert f"no evaluation at the end: {out}/train.jsonl has no built-in test split" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(run, "eval.json"))
    ev.main(["--model", os.path.join(run, "final"), "--dataset", f"{out}/test.jsonl", "--out", str(tmp_path / "e.json")])
    saved = json.load(open(tmp_path / "e.json"))
    assert saved["n"] == 2 and saved["classes"] == ["benign", "malignant"] and "qwk" not in saved
    model = os.path.join(run, "final")  # a set of other classes, or of the other task, is refused
    with pytest.raises(SystemExit, match=r"synth:grade: its classes \['grade 0'.*are not the expected "
                                         r"\['benign', 'malignant'\] \(the model's\)"):
        ev.main(["--model", model, "--dataset", "synth:grade"])
    with pytest.raises(SystemExit, match=f"{model} is a classification model and synth:derm a grounding set"):
        ev.main(["--model", model, "--dataset", "synth:derm"])
    with pytest.raises(SystemExit, match="tiny is a grounding model and synth:type a classification set"):
        ev.main(["--model", "tiny", "--dataset", "synth:type"])


def test_bad_class_records_and_labels_name_the_file_line_and_field(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b"]}))
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "label": "a"}\n{"image": "x.png", "label": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'label': 'c' is not one of \['a', 'b'\]"):
        load_class_dataset(str(tmp_path / "d.jsonl"), str(tmp_path / "labels.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"classes": ["a", "A"]}))
    with pytest.raises(DataError, match=r"bad.json: field 'classes': \['A', 'a'\] are one answer"):
        load_class_dataset(str(tmp_path / "d.jsonl"), str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="needs --labels"):
        load_class_dataset(str(tmp_path / "d.jsonl"))


def test_flag_mistakes_of_the_classification_task_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--recite-weight -0.5 needs --knowledge"):
        train.main(["--task", "classify", "--dataset", "synth:type", "--recite-weight", "-0.5",
                    "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--mfrs-weight 1.0: the classes of synth:type are not ordinal"):
        train.main(["--task", "classify", "--dataset", "synth:type", "--mfrs-weight", "1", "--out", str(tmp_path / "b")])


def test_knowledge_from_a_file_gives_the_classes_their_descriptions(tmp_path):
    """`--knowledge` alone uses the labels' own descriptions; `--knowledge FILE` those of FILE
    (matched by class name, in order), and FILE names the classes when --labels is not given."""
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "label": "a"}\n{"image": "x.png", "label": "b"}\n')
    (tmp_path / "names.json").write_text(json.dumps({"classes": ["a", "b"]}))
    (tmp_path / "know.json").write_text(json.dumps({"classes": [{"name": "a", "description": "round"},
                                                                {"name": "b", "description": "jagged"}]}))
    (tmp_path / "swapped.json").write_text(json.dumps({"classes": ["b", "a"]}))

    def labels(*flags):
        cfg = load_config(parse_args(["--task", "classify", "--dataset", str(tmp_path / "d.jsonl"), *flags]))
        return start.load_data(cfg)[3]
    assert parse_args(["--knowledge"])["knowledge"] is True
    assert labels("--labels", str(tmp_path / "names.json")).descriptions == ["", ""]
    assert labels("--labels", str(tmp_path / "names.json"), "--knowledge", str(tmp_path / "know.json")).descriptions \
        == ["round", "jagged"]
    assert labels("--knowledge", str(tmp_path / "know.json")).names == ["a", "b"]
    with pytest.raises(DataError, match=r"swapped.json: field 'classes': \['b', 'a'\] are not the dataset's classes"):
        labels("--labels", str(tmp_path / "names.json"), "--knowledge", str(tmp_path / "swapped.json"))
    with pytest.raises(DataError, match="no descriptions to inject"):
        labels("--labels", str(tmp_path / "names.json"), "--knowledge")
    cfg = load_config(parse_args(["--task", "classify", "--dataset", "synth:type", "--knowledge"]))
    assert start.load_data(cfg)[3].descriptions == SYNTH_LABELS["type"].descriptions


def test_a_short_classification_run_logs_and_evaluates_the_new_metrics(tmp_path, capsys):
    run = str(tmp_path / "run")
    train.main(["--task", "classify", "--dataset", "synth:grade", "--sft-steps", "2", "--sft-batch", "2",
                "--steps", "2", "--batch-prompts", "2", "--group-size", "4", "--eval-n", "6", "--knowledge",
                "--mfrs-weight", "1", "--template", "r1", "--recite-weight", "0.5", "--max-new-tokens", "16",
                "--threads", "1", "--out", run])
    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(log) == 2 and {"acc_mean", "mfrs_mean", "recite_mean", "reward_mean"} <= set(log[0])
    assert "tau" not in log[0] and log[0]["seconds_rollout"] > 0
    saved = json.load(open(os.path.join(run, "eval.json")))
    assert {"accuracy", "macro_f1", "qwk", "mae", "confusion"} <= set(saved) and saved["n"] == 6
    assert os.path.getsize(os.path.join(run, "eval_confusion.png")) > 1000
    out = str(tmp_path / "again.json")  # eval.py reads the task, labels, knowledge and length from the model
    ev.main(["--model", os.path.join(run, "final"), "--dataset", "synth:grade", "--n", "6", "--out", out])
    again = json.load(open(out))
    assert again["accuracy"] == saved["accuracy"] and again["qwk"] == saved["qwk"]
    assert SYNTH_LABELS["grade"].names == again["classes"]


def test_a_set_of_the_other_task_says_which_flag_is_missing(tmp_path):
    with pytest.raises(SystemExit, match=r"'grade'.*a classification set: train with --task classify"):
        train.main(["--dataset", "synth:grade", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"'derm'.*a grounding set: drop --task classify"):
        train.main(["--task", "classify", "--dataset", "synth:derm", "--out", str(tmp_path / "b")])
