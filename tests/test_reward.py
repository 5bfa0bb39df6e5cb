import math

import pytest

from reward import format_reward, from_image_frame, giou01, iou, parse_box, score_completions, to_image_frame


@pytest.mark.parametrize("text, box", [
    ("<answer>[10, 20, 30, 40]</answer>", (10, 20, 30, 40)),
    ("<answer>[1.5,-2,3e1,  .5]</answer>", (1.5, -2, 30, 0.5)),
    ('<think>hmm [9, 9]</think><answer>{"bbox_2d": [12, 34, 56, 78]}</answer>', (12, 34, 56, 78)),
    ('<answer>```json\n{"bbox_2d": [1, 2, 3, 4], "label": "lesion"}\n```</answer>', (1, 2, 3, 4)),
    ("<|box_start|>(100,200),(300,400)<|box_end|>", (100, 200, 300, 400)),
    ("the box is ( 1 , 2 ), ( 3 , 4 )", (1, 2, 3, 4)),
    ("no tags: [5, 6, 7, 8] then [1, 1, 2, 2]", (5, 6, 7, 8)),
    ("(1,2),(3,4) before [5,6,7,8]", (1, 2, 3, 4)),  # the first box in the text wins
])
def test_parse_box_accepts_each_syntax(text, box):
    assert parse_box(text) == tuple(float(v) for v in box)


@pytest.mark.parametrize("text", ["<answer>[1, 2, 3]</answer>", "I cannot see a lesion.", "",
                                  "<answer></answer>[1,2,3,4]", "(1,2)"])
def test_parse_box_near_misses_give_none(text):
    assert parse_box(text) is None


def test_parse_box_takes_the_first_answer_block():
    assert parse_box("<answer>[1,2,3,4]</answer><answer>[5,6,7,8]</answer>") == (1, 2, 3, 4)


def test_parse_box_returns_numbers_as_written():
    assert parse_box("[30, 40, 10, 20]") == (30, 40, 10, 20)  # inverted: not reordered


def test_iou_hand_computed():
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)  # nested
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0  # disjoint
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edge: no +1 pixel convention
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [(2, 2, 1, 1), (0, 0, 0, 5), (3, 0, 3, 3), None])
def test_iou_of_inverted_empty_or_missing_box_is_zero(bad):
    assert iou(bad, (0, 0, 5, 5)) == 0.0
    assert iou((0, 0, 5, 5), bad) == 0.0


def test_giou01():
    assert giou01((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    # disjoint: IoU 0, hull 3x3=9, union 2 -> GIoU = -7/9 -> (1 - 7/9) / 2
    assert giou01((0, 0, 1, 1), (2, 2, 3, 3)) == pytest.approx((1 - 7 / 9) / 2)
    assert giou01((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0


def test_abs_frame_on_non_square_image():
    # original 1000x500 (W x H) resized to 280x140 for the model: x scales by 1000/280, y by 500/140
    box = to_image_frame((28, 14, 140, 70), "abs", (1000, 500), (280, 140))
    assert box == pytest.approx((100, 50, 500, 250))
    # a frame whose aspect ratio differs from the original's: x and y scale separately
    assert to_image_frame((10, 10, 20, 20), "abs", (300, 600), (100, 100)) == pytest.approx((30, 60, 60, 120))


def test_norm1000_frame_on_non_square_image():
    assert to_image_frame((100, 500, 600, 1000), "norm1000", (2000, 300), (0, 0)) == pytest.approx(
        (200, 150, 1200, 300))


def test_frame_conversion_clips_and_round_trips():
    assert to_image_frame((-10, -5, 500, 90), "abs", (200, 100), (100, 50)) == (0, 0, 200, 100)
    box = (13.0, 7.0, 190.0, 88.0)
    for coord in ("abs", "norm1000"):
        there = from_image_frame(box, coord, (200, 100), (112, 56))
        assert to_image_frame(there, coord, (200, 100), (112, 56)) == pytest.approx(box)
    assert to_image_frame(None, "abs", (1, 1), (1, 1)) is None
    with pytest.raises(ValueError, match="coordinate frame"):
        to_image_frame((0, 0, 1, 1), "pixels", (1, 1), (1, 1))


def test_format_reward_per_template():
    assert format_reward("<answer>[1,2,3,4]</answer>", "short") == 1.0
    assert format_reward("<answer>[1,2,3]</answer>", "short") == 0.0
    assert format_reward("x<answer>[1,2,3,4]</answer>", "short") == 0.0
    r1 = '<think>look</think>\n<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    assert format_reward(r1, "r1") == 1.0
    assert format_reward('<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', "r1") == 0.0  # no think
    assert format_reward("<think>a</think><answer>none</answer>", "r1") == 0.0  # no box


def test_score_completions_threshold_iou_and_failures():
    gt = (0, 0, 100, 100)
    texts = ["<answer>[0,0,100,100]</answer>",   # exact: IoU 1
             "<answer>[0,0,100,50]</answer>",    # IoU 0.5
             "[0,0,100,40]",                      # IoU 0.4, no answer tags: format 0
             "nothing"]                           # parse failure
    common = dict(gt_boxes=[gt] * 4, image_sizes=[(100, 100)] * 4, input_sizes=[(100, 100)] * 4,
                  coord="abs", template="short")
    s = score_completions(texts, tau=0.5, mode="threshold", w_fmt=0.5, **common)
    assert s["iou"].tolist() == pytest.approx([1.0, 0.5, 0.4, 0.0])
    assert s["acc"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert s["fmt"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert s["reward"].tolist() == [1.5, 1.5, 0.0, 0.0]
    assert s["parse_fail"].tolist() == [0.0, 0.0, 0.0, 1.0]
    raw = score_completions(texts, tau=None, mode="iou", w_fmt=1.0, **common)
    assert raw["reward"].tolist() == pytest.approx([2.0, 1.5, 0.4, 0.0])
    with pytest.raises(ValueError, match="needs a tau"):
        score_completions(texts, tau=None, mode="threshold", **common)


def test_score_rescales_model_frame_before_iou():
    # a 1000x600 image the model saw at 280x168: the GT written in the model's frame scores IoU 1
    s = score_completions(["<answer>[28,28,140,84]</answer>"], [(100, 100, 500, 300)], [(1000, 600)],
                          [(280, 168)], "abs", 0.5)
    assert s["iou"].item() == pytest.approx(1.0)
    assert not math.isnan(s["reward"].item())


def test_area_ratio_and_the_area_column_by_hand():
    from reward import area_ratio
    assert area_ratio((0, 0, 20, 10), (5, 5, 15, 10)) == pytest.approx(4.0)  # 200 / 50
    assert area_ratio(None, (0, 0, 1, 1)) is None and area_ratio((3, 3, 1, 1), (0, 0, 1, 1)) is None
    cols = score_completions(["<answer>[0,0,20,10]</answer>", "no box"], [(5, 5, 15, 10)] * 2, [(100, 100)] * 2,
                             [(100, 100)] * 2, "abs", 0.5)
    assert cols["area"][0].item() == pytest.approx(4.0) and math.isnan(cols["area"][1].item())


def test_loose_sft_targets_scale_the_true_box_about_its_centre_clipped_to_the_image():
    from data import Sample
    from tasks import Grounding, loosened
    s = Sample(None, "q", (10.0, 10.0, 30.0, 20.0), (100, 100), "a.jsonl:1")
    assert loosened(s, 1.5, 1.5) == pytest.approx((5.0, 7.5, 35.0, 22.5))  # centre (20, 15), 30 x 15
    edge = Sample(None, "q", (0.0, 90.0, 20.0, 100.0), (100, 100), "a.jsonl:2")
    assert loosened(edge, 2.0, 2.0) == pytest.approx((0.0, 85.0, 30.0, 100.0))  # clipped at the image's edges
    factors = set()
    for i in range(50):  # one factor per example, in [lo, hi], the same every time it is drawn
        b = loosened(Sample(None, "q", (40.0, 40.0, 60.0, 60.0), (100, 100), f"a.jsonl:{i}"), 1.2, 1.4)
        f = (b[2] - b[0]) / 20
        assert 1.2 <= f <= 1.4 and b == loosened(Sample(None, "q", (40.0, 40.0, 60.0, 60.0), (100, 100), f"a.jsonl:{i}"), 1.2, 1.4)
        factors.add(round(f, 6))
    assert len(factors) == 50
    plain, loose = Grounding("short", "abs"), Grounding("short", "abs", box_scale=(1.5, 1.5))
    assert plain.sft_answer(s, 0, (100, 100)) == "<answer>[10,10,30,20]</answer>"
    assert loose.sft_answer(s, 0, (100, 100)) == "<answer>[5,8,35,22]</answer>"  # 7.5 and 22.5 rounded to even
    preds = [loose.predict(t, s, (100, 100)) for t in ("<answer>[5,8,35,22]</answer>", "<answer>[10,10,30,20]</answer>", "x")]
    assert loose.metrics([s] * 3, preds)["box_area_ratio"] == pytest.approx((30 * 14 / 200 + 1) / 2)  # parsed ones only
