"""Several boxes per query (METHOD.md 4.2 and 7): the strict list parser, the one-to-one matching
of largest total IoU, F1 at tau, the soft F1 and the per-sample AP, by hand; one box on each
side gives the one-box task's numbers; the data, the task and a run through train.py and eval.py."""
import itertools
import json
import random

import pytest
import torch

import eval as ev
import train
from data import DataError, load_dataset, several_boxes
from reward import (best_assignment, f1_at, iou, match_boxes, overlaps, parse_box, parse_boxes, score_completions, score_multi,
                    soft_f1)
from scheduler import MedLocScheduler
from tasks import MultiGrounding, ap50, boxes_text

A, B, C = (0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)  # three boxes apart


@pytest.mark.parametrize("text, boxes", [
    ('<answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8.5]}]</answer>', [(1, 2, 3, 4), (5, 6, 7, 8.5)]),
    ("<answer>[[1,2,3,4],[5,6,7,8]]</answer>", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    ('<think>x</think><answer>```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```</answer>', [(1, 2, 3, 4)]),
    ('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', [(1, 2, 3, 4)]),   # one box alone
    ("<answer>[1, 2, 3, 4]</answer>", [(1, 2, 3, 4)]),
    ("<answer>[]</answer>", []),                                       # no finding: a valid answer
    ("<answer>[[1,2,3,4],[1,2,3]]</answer>", None),                  # one malformed item spoils the list
    ('<answer>[{"bbox_2d": [1, 2, 3, 4]}, {"box": [5, 6, 7, 8]}]</answer>', None),
    ("<answer>[[1,2,3,4], [true, 2, 3, 4]]</answer>", None),
    ("<answer>[[1,2,3,4]] and more</answer>", None),                  # text around the list
    ("<answer>[[1,2,3,4],</answer>", None),                           # cut off
    ("<answer>[[NaN, 2, 3, 4]]</answer>", None),
    ("no answer", None),
])
def test_the_list_parser_is_strict(text, boxes):
    assert parse_boxes(text) == boxes


def test_the_assignment_of_largest_total_weight_is_that_of_every_permutation():
    rng = random.Random(0)
    for _ in range(200):
        rows, cols = rng.randint(1, 5), rng.randint(1, 5)
        w = [[rng.choice([0.0, rng.random()]) for _ in range(cols)] for _ in range(rows)]
        got = best_assignment(w)
        assert len(got) == min(rows, cols) and len(set(got.values())) == len(got)
        best = max(sum(w[i][j] for i, j in enumerate(p) if j is not None)
                   for p in itertools.permutations(list(range(cols)) + [None] * rows, rows))
        assert sum(w[i][j] for i, j in got.items()) == pytest.approx(best, abs=1e-12)


def test_the_one_to_one_matching_beats_greedy_where_greedy_is_wrong():
    """True T1 = (0, 0, 10, 10) and T2 = (1, 0, 5, 10); predicted P1 = (0, 0, 5, 10), P2 = (1, 0, 4, 10).
    IoUs: P1-T1 50/100 = 0.5, P1-T2 40/50 = 0.8, P2-T1 30/100 = 0.3, P2-T2 30/40 = 0.75. Greedy
    (largest IoU first) pairs P1-T2, then P2-T1: total 1.1, one pair at IoU >= 0.5, F1@0.5 = 2/4.
    The largest total is P1-T1 + P2-T2 = 1.25: both pairs count, F1@0.5 = 1."""
    T, P = [(0, 0, 10, 10), (1, 0, 5, 10)], [(0, 0, 5, 10), (1, 0, 4, 10)]
    assert [iou(p, t) for p in P for t in T] == pytest.approx([0.5, 0.8, 0.3, 0.75])
    matched = match_boxes(P, T)
    assert matched == pytest.approx([0.5, 0.75])
    assert f1_at(overlaps(P, T), 2, 2, 0.5) == 1.0 and soft_f1(matched, 2, 2) == pytest.approx(2 * 1.25 / 4)
    assert f1_at(overlaps(P, T), 2, 2, 0.6) == pytest.approx(0.5)


def test_f1_and_soft_f1_by_hand_for_none_to_three_boxes_a_side():
    # 0 predicted, 2 true: nothing matched, F1 0
    assert match_boxes([], [A, B]) == [] and f1_at(overlaps([], [A, B]), 0, 2, 0.5) == 0 and soft_f1([], 0, 2) == 0
    # 1 predicted (A exactly), 2 true: TP 1, F1 = 2 / 3, soft = 2 * 1 / 3
    m = match_boxes([A], [A, B])
    assert m == [1.0] and f1_at(overlaps([A], [A, B]), 1, 2, 0.5) == pytest.approx(2 / 3)
    assert soft_f1(m, 1, 2) == pytest.approx(2 / 3)
    # 3 predicted: A, A again (a duplicate: no second partner), and B shifted by 5 (IoU 5/15 = 1/3); 2 true
    shifted = (25, 0, 35, 10)
    m = match_boxes([A, A, shifted], [A, B])
    assert sorted(m) == pytest.approx([1 / 3, 1.0])
    three = overlaps([A, A, shifted], [A, B])
    assert f1_at(three, 3, 2, 0.5) == pytest.approx(2 * 1 / 5) and f1_at(three, 3, 2, 0.3) == pytest.approx(2 * 2 / 5)
    assert soft_f1(m, 3, 2) == pytest.approx(2 * (1 + 1 / 3) / 5)
    # 2 predicted, 3 true, both exact: F1 = 4 / 5
    m = match_boxes([C, A], [A, B, C])
    assert m == [1.0, 1.0] and f1_at(overlaps([C, A], [A, B, C]), 2, 3, 0.8) == pytest.approx(4 / 5)
    # 3 and 3, all exact in another order: 1
    assert f1_at(overlaps([C, B, A], [A, B, C]), 3, 3, 0.95) == 1.0


def test_one_box_a_side_gives_the_one_box_rewards_and_the_one_box_curriculum():
    rng = random.Random(1)
    texts, truths = [], []
    for _ in range(40):
        x, y = rng.uniform(0, 60), rng.uniform(0, 60)
        box = [round(v) for v in (x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40))]
        texts.append(f"<answer>[{','.join(map(str, box))}]</answer>")
        truths.append((rng.uniform(0, 50), rng.uniform(0, 50), rng.uniform(55, 100), rng.uniform(55, 100)))
    texts += ["<answer>nothing</answer>"]
    truths += [(1.0, 1.0, 9.0, 9.0)]
    size = [(100, 100)] * len(texts)
    for tau in (0.3, 0.5, 0.8):
        one = score_completions(texts, truths, size, size, "abs", tau)
        several = score_multi(texts, [[t] for t in truths], size, size, "abs", tau)
        for key in ("acc", "fmt", "reward", "parse_fail"):
            assert torch.equal(one[key], several[key]), key
        assert torch.equal(one["iou"], several["iou"])
        assert torch.equal((one["iou"] >= tau).float(), several["hit"])
        one_window, several_window = MedLocScheduler(tau0=tau, window=2), MedLocScheduler(tau0=tau, window=2)
        one_window.update(one["iou"])
        several_window.update(several["iou"], several["hit"])
        assert one_window.entries[0] == pytest.approx(several_window.entries[0])
    raw = score_multi(texts, [[t] for t in truths], size, size, "abs", None, mode="iou")
    assert torch.allclose(raw["acc"], score_completions(texts, truths, size, size, "abs", None, mode="iou")["acc"])


def test_ap50_by_hand_in_the_order_written():
    # truths A, B; predictions: A (TP at rank 1: precision 1), C (FP), B (TP at rank 3: precision 2/3)
    assert ap50([A, C, B], [A, B]) == pytest.approx((1 + 2 / 3) / 2)
    assert ap50([C, A, B], [A, B]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert ap50([A, A], [A]) == 1.0          # the duplicate comes after: precision at A's rank is 1
    assert ap50([], [A]) == 0 and ap50([A], []) == 0
    assert ap50([(0, 0, 10, 19)], [A]) == 1.0 and ap50([(0, 0, 10, 21)], [A]) == 0  # IoU 100/190, 100/210


def test_the_task_writes_reads_and_scores_its_own_answers():
    task = MultiGrounding("r1", "norm1000")
    text = boxes_text([(100, 0, 200, 100), (0, 500, 250, 1000)], "r1")
    assert text.endswith('<answer>[{"bbox_2d": [100, 0, 200, 100]}, {"bbox_2d": [0, 500, 250, 1000]}]</answer>')
    assert parse_boxes(text) == [(100, 0, 200, 100), (0, 500, 250, 1000)]
    sample = load_dataset("synth:multi", n=8)[5]
    answer = task.sft_answer(sample, 0, (112, 84))
    pred = task.predict(answer, sample, (112, 84))
    assert len(pred["boxes"]) == len(sample.truth()) and min(pred["matched"]) > 0.9
    assert pred["f1@0.5"] == pred["ap50"] == 1.0 and pred["parse_fail"] is False


def write_image(path, size=(120, 90)):
    from PIL import Image
    Image.new("RGB", size, (90, 60, 40)).save(path)


def test_records_of_several_boxes_load_and_each_box_is_checked_where_it_is(tmp_path):
    write_image(tmp_path / "a.png")
    lines = [{"image": "a.png", "problem": "Find them.", "boxes": [[1, 2, 30, 40], [50, 10, 80, 60]]},
             {"image": "a.png", "problem": "Find it.", "solution": [3, 4, 20, 30]}]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    several, one = load_dataset(str(tmp_path / "ok.jsonl"))
    assert several.truth() == ((1, 2, 30, 40), (50, 10, 80, 60)) and several.box is None
    assert one.truth() == ((3, 4, 20, 30),) and several_boxes([several, one]) and not several_boxes([one])
    for record, why in [
            ({"boxes": [[1, 2, 30, 40], [50, 10, 130, 60]]}, "bad.jsonl:1: field 'boxes' (box 2): box [50.0, 10.0, "
                                                             "130.0, 60.0] (xyxy) is outside the 120x90 image"),
            ({"boxes": []}, "bad.jsonl:1: field 'boxes': expected a list of one or more"),
            ({"boxes": [[1, 2, 30, 40], [1, 2, 3]]}, "bad.jsonl:1: field 'boxes' (box 2): box is not 4 finite numbers"),
            ({"solution": '[{"bbox_2d": [1, 2, 30, 40]}, {"bbox_2d": [5, 6, 70, 80]}]'},
             "bad.jsonl:1: field 'solution': holds 2 boxes; give a record's several boxes as field 'boxes'")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "problem": "q", **record}) + "\n")
        with pytest.raises(DataError) as e:
            load_dataset(str(tmp_path / "bad.jsonl"))
        assert why in str(e.value)


def test_rsna_kept_whole_trains_and_evaluates_with_every_sample_written_out(tmp_path):
    """prepare.py rsna --multi-box keep (one to four boxes a patient) -> 2 GRPO steps -> eval.py
    --predictions: eval.json's numbers recomputed from the per-sample lines."""
    import numpy as np
    import prepare
    from test_prepare import RSNA, csv_table, write_dicom
    images = tmp_path / "images"
    images.mkdir()
    per_patient = {}
    for row in csv_table(RSNA)[1:]:
        if row[5] == "1":
            per_patient[row[0]] = per_patient.get(row[0], 0) + 1
    chosen = [p for p, k in per_patient.items() if k > 1][:6] + [p for p, k in per_patient.items() if k == 1][:4]
    for p in chosen:
        write_dicom(str(images / f"{p}.dcm"), np.zeros((1024, 1024), np.uint8), PatientID=p)
    rows = [r for r in csv_table(RSNA) if r[0] in chosen or r[0] == "patientId"]
    (tmp_path / "labels.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    report = prepare.main(["rsna", str(tmp_path / "labels.csv"), "--images", str(images), "--out", str(tmp_path / "d"),
                           "--multi-box", "keep", "--max-side", "128", "--split", "0.5,0,0.5", "--quiet"])
    counts = {str(k): sum(1 for p in chosen if per_patient[p] == k) for k in sorted(set(per_patient[p] for p in chosen))}
    assert report["boxes_per_record"] == counts and "1" in counts and len(counts) > 1
    run = tmp_path / "run"
    train.main(["--dataset", str(tmp_path / "d" / "train.jsonl"), "--steps", "2", "--sft-steps", "2", "--batch-prompts", "2",
                "--group-size", "2", "--eval-dataset", "none", "--threads", "1", "--out", str(run)])
    assert json.loads((run / "final" / "config.json").read_text())["medloc_task"] == "ground-multi"
    ev.main(["--model", str(run / "final"), "--dataset", str(tmp_path / "d" / "test.jsonl"), "--out",
             str(tmp_path / "e.json"), "--predictions", str(tmp_path / "p.jsonl"), "--save-vis", "2"])
    metrics = json.loads((tmp_path / "e.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == metrics["n"] == report["records"]["test"]
    assert all(len(x["truth"]) >= 1 and x["image"].endswith(".png") for x in lines)
    for key, field in (("F1@0.5", "f1@0.5"), ("F1@0.8", "f1@0.8"), ("soft_F1", "soft_f1"), ("mAP@0.5", "ap50")):
        assert metrics[key] == pytest.approx(sum(x[field] for x in lines) / len(lines))
    for x in lines:  # the per-sample numbers from the boxes written out
        boxes = [tuple(b) for b in x["boxes"]]
        truth = [tuple(b) for b in x["truth"]]
        assert x["matched"] == pytest.approx(match_boxes(boxes, truth))
        assert x["ap50"] == pytest.approx(ap50(boxes, truth))
    assert len(list((tmp_path / "e_vis").iterdir())) == 2


def test_a_one_box_model_is_not_scored_on_several_boxes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "tiny", "--dataset", "synth:multi", "--n", "2"])
    assert str(e.value) == ("error: tiny answers one box per query, and synth:multi gives several: evaluate a model "
                            "trained on several boxes (--task ground-multi)")


def test_predictions_of_a_one_box_model_recompute_its_metrics(tmp_path):
    ev.main(["--model", "tiny", "--dataset", "synth:derm", "--n", "6", "--out", str(tmp_path / "e.json"),
             "--predictions", str(tmp_path / "p.jsonl")])
    metrics = json.loads((tmp_path / "e.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [x["source"] for x in lines] == [f"synth:derm:test:{i}" for i in range(6)]
    assert metrics["mIoU"] == pytest.approx(sum(x["iou"] for x in lines) / 6)
    assert metrics["A@0.5"] == pytest.approx(sum(x["iou"] >= 0.5 for x in lines) / 6)
    for x in lines:
        assert x["iou"] == pytest.approx(iou(x["box"], x["truth"][0]) if x["box"] else 0.0)
        assert x["parse_fail"] == (parse_box(x["answer"]) is None)


def test_one_box_options_on_several_boxes_are_one_line_before_anything_loads(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "synth:multi", "--reward", "giou", "--out", str(tmp_path / "a")])
    assert str(e.value).endswith("synth:multi gives several boxes per query: --sft-box-scale and --reward giou have "
                                 "no several-box form (METHOD.md 4.2)") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--task", "ground-multi", "--sft-box-scale", "1.1,1.2", "--out", str(tmp_path / "b")])
    assert "--sft-box-scale and --reward giou have no several-box form" in str(e.value)
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


def test_f1_at_tau_counts_the_most_hits_of_any_one_to_one_matching():
    """The review's case: IoUs [[.571, .467], [.207, 0]]. The matching of largest total IoU
    (P1-T2 + P2-T1 = 0.674) has no pair at >= 0.5; P1-T1 alone has one: F1@0.5 = 2 * 1 / 4 = 0.5.
    On random cases the count equals brute force over every one-to-one matching."""
    import itertools
    import random
    P, T = [(10, 12, 18, 19), (16, 16, 20, 20)], [(10, 14, 19, 20), (11, 11, 15, 19)]
    assert [[round(v, 3) for v in row] for row in overlaps(P, T)] == [[0.571, 0.467], [0.207, 0.0]]
    assert f1_at(overlaps(P, T), 2, 2, 0.5) == 0.5

    def brute(overlap, tau):
        rows, cols = len(overlap), len(overlap[0])
        best = 0
        for perm in itertools.permutations(range(max(rows, cols)), rows):
            best = max(best, sum(overlap[i][j] >= tau for i, j in enumerate(perm) if j < cols))
        return best
    rng = random.Random(0)
    for _ in range(300):
        rows, cols = rng.randint(1, 5), rng.randint(1, 5)
        overlap = [[rng.choice([0.0, rng.random()]) for _ in range(cols)] for _ in range(rows)]
        tau = rng.choice([0.3, 0.5, 0.8])
        assert f1_at(overlap, rows, cols, tau) == pytest.approx(2 * brute(overlap, tau) / (rows + cols)), (overlap, tau)


def test_the_largest_total_iou_can_hold_fewer_hits_than_another_matching():
    """Two pairs at 0.45 + 0.45 (total 0.9) against one at 0.85 and one at 0.0: the largest total
    IoU keeps the two, with no hit at 0.5; the most hits at 0.5 is one."""
    overlap = [[0.85, 0.45], [0.45, 0.0]]
    assert sum(v >= 0.5 for v in [overlap[i][j] for i, j in best_assignment(overlap).items()]) == 0
    assert f1_at(overlap, 2, 2, 0.5) == 0.5


def test_huge_numbers_deep_nesting_and_too_many_boxes_are_unparsed_answers_never_exceptions():
    import json
    from reward import MAX_ANSWER_BOXES
    huge = "<answer>[[" + "1" * 400 + ", 2, 3, 4]]</answer>"
    nested = "<answer>" + "[" * 100_000 + "]" * 100_000 + "</answer>"
    boxes = [[k, k, k + 5, k + 5] for k in range(1000)]
    for text in (huge, nested, "<answer>" + json.dumps(boxes) + "</answer>",
                 "<answer>" + json.dumps(boxes[:MAX_ANSWER_BOXES + 1]) + "</answer>"):
        assert parse_boxes(text) is None
    assert len(parse_boxes(json.dumps(boxes[:MAX_ANSWER_BOXES]))) == MAX_ANSWER_BOXES
    scores = score_multi([huge, nested, json.dumps(boxes)], [[(0, 0, 5, 5)]] * 3, [(100, 100)] * 3, [(100, 100)] * 3,
                         "abs", 0.5)
    assert scores["parse_fail"].tolist() == [1.0, 1.0, 1.0] and scores["reward"].tolist() == [0.0, 0.0, 0.0]


def pycocotools_ap50(pred, true):
    """One image's AP@0.5 by pycocotools' own COCOeval: one category, the predictions scored in the
    order written, boxes as COCO's x, y, w, h."""
    import contextlib
    import io
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 200, "height": 200}], "categories": [{"id": 1, "name": "f"}],
                  "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": xywh(t), "iscrowd": 0,
                                   "area": (t[2] - t[0]) * (t[3] - t[1])} for k, t in enumerate(true)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": 1, "category_id": 1, "bbox": xywh(p), "score": 1 - k / 1000}
                         for k, p in enumerate(pred)]) if pred else COCO()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs, ev.params.areaRng, ev.params.areaRngLbl = np.array([0.5]), [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    return float(np.mean(ev.eval["precision"][0, :, 0, 0, -1]))


def test_the_coco_ap50_equals_pycocotools_cocoeval_per_image():
    pytest.importorskip("pycocotools")
    import random
    from tasks import coco_ap50
    rng = random.Random(1)

    def box():
        x, y = rng.uniform(0, 150), rng.uniform(0, 150)
        return (x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50))
    for _ in range(150):
        true = [box() for _ in range(rng.randint(1, 4))]
        moved = [[v + rng.uniform(-8, 8) for v in t] for t in rng.sample(true, rng.randint(0, len(true)))]
        pred = [(min(x1, x2), min(y1, y2), max(x1, x2) + 1, max(y1, y2) + 1) for x1, y1, x2, y2 in moved]
        pred += [box() for _ in range(rng.randint(0, 3))]  # near the truth, and anywhere
        rng.shuffle(pred)
        assert coco_ap50(pred, true) == pytest.approx(pycocotools_ap50(pred, true), abs=1e-12), (pred, true)
    # by hand: a miss, then a hit, on one true box: precision 1/2 at recall 1, so AP = 0.5
    assert coco_ap50([(50, 50, 60, 60), (0, 0, 10, 10)], [(0, 0, 10, 10)]) == 0.5
    assert coco_ap50([], [(0, 0, 10, 10)]) == 0.0
