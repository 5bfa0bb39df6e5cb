import pytest
import torch

from scheduler import FixedSchedule, MedLocScheduler, RawIoUSchedule, StagedSchedule, make_schedule


def feed(s, ious, steps):
    """Call update `steps` times with the same IoUs; return the steps (1-based) where tau rose."""
    return [k for k in range(1, steps + 1) if s.update(ious)]


def test_tau_climbs_through_every_piecewise_stage_and_stops_at_target():
    s = MedLocScheduler()
    taus = []
    for _ in range(200):
        if s.update([0.95] * 32):  # every completion hits, margin 0.95 - tau >= 0.1 at every stage
            taus.append(s.tau)
    assert taus == [0.45, 0.6, 0.7, 0.8]  # 0.3 +0.15 +0.15 +0.10 +0.10 lands exactly on 0.8
    assert s.tau == 0.8


def test_first_raise_needs_a_full_window_then_half_a_window():
    s = MedLocScheduler(window=30)
    raises = feed(s, [0.95] * 8, 80)
    assert raises == [30, 45, 60, 75]  # refresh keeps 15 entries, so 15 more steps fill the window
    assert len(s.entries) == 15 + 5  # at the target nothing is dropped any more


def test_window_refresh_keeps_the_newest_half():
    s = MedLocScheduler(window=4)
    for v in (0.91, 0.92, 0.93):
        assert not s.update([v])
    assert s.update([0.94])
    assert s.tau == 0.45
    assert list(s.entries) == [(1.0, 0.93), (1.0, 0.94)]


def test_blocked_by_reward_condition_alone():
    # hit rate 0.75 < P = 0.8; std 0; mean IoU well above tau + margin
    ious = [0.9] * 6 + [0.1] * 2
    assert feed(MedLocScheduler(margin=0.0), [0.99] * 6 + [0.0] * 2, 100) == []
    assert feed(MedLocScheduler(use_reward=False, margin=0.0), ious, 30) == [30]


def test_blocked_by_stability_condition_alone():
    s = MedLocScheduler(window=4, margin=0.0)
    steps = [[0.9] * 10, [0.9] * 10, [0.9] * 10, [0.9] * 5 + [0.1] * 5]  # rates 1, 1, 1, 0.5
    # r_bar = 0.875 >= 0.8 but sigma = sqrt(3 * 0.125^2 + 0.375^2) / 2 = 0.2165 > 0.2
    assert [s.update(x) for x in steps] == [False] * 4
    r_bar, sigma, _ = s.readiness()
    assert r_bar == pytest.approx(0.875) and sigma == pytest.approx(0.21650635)
    s2 = MedLocScheduler(window=4, margin=0.0, use_stability=False)
    assert [s2.update(x) for x in steps] == [False, False, False, True]


def test_blocked_by_margin_condition_alone():
    # every IoU hits at 0.3 but the mean IoU 0.35 is only 0.05 above tau < Delta = 0.1
    assert feed(MedLocScheduler(), [0.35] * 8, 100) == []
    assert feed(MedLocScheduler(use_margin=False), [0.35] * 8, 30) == [30]


def test_population_std_of_step_rates_not_pooled_rewards():
    s = MedLocScheduler(window=2)
    s.update([1.0, 0.0])
    s.entries.append((0.5, 0.5))
    assert s.readiness()[1] == 0.0  # pooled 0/1 rewards would give 0.5


def test_tau_never_falls_and_hit_rate_uses_current_tau():
    s = MedLocScheduler(window=2, tau0=0.3)
    s.update([0.95] * 4)
    s.update([0.95] * 4)
    assert s.tau == 0.45
    s.update(torch.tensor([0.4, 0.4, 0.5, 0.5]))  # tensors accepted; 0.4 misses at tau 0.45
    assert s.entries[-1] == pytest.approx((0.5, 0.45))
    for _ in range(10):
        s.update([0.0] * 4)
    assert s.tau == 0.45


def test_step_rules():
    lin = MedLocScheduler(step_rule="linear", tau0=0.2, tau_target=0.8, delta0=0.2, min_delta=0.05)
    assert lin.delta(0.2) == pytest.approx(0.2)
    assert lin.delta(0.5) == pytest.approx(0.1)  # f = 0.5
    assert lin.delta(0.75) == pytest.approx(0.05)  # floor: 0.2 * (1 - 11/12) < 0.05
    cos = MedLocScheduler(step_rule="cosine", tau0=0.2, tau_target=0.8, delta0=0.2, min_delta=0.05)
    assert cos.delta(0.2) == pytest.approx(0.2)
    assert cos.delta(0.5) == pytest.approx(0.1)
    assert cos.delta(0.35) == pytest.approx(0.2 * (1 + 2 ** -0.5) / 2)
    assert MedLocScheduler(step_rule="constant", constant_delta=0.25).delta(0.7) == 0.25
    pw = MedLocScheduler()
    assert [pw.delta(t) for t in (0.3, 0.549, 0.55, 0.7, 0.75, 0.79)] == [0.15, 0.15, 0.10, 0.10, 0.05, 0.05]


def test_linear_rule_reaches_target():
    s = MedLocScheduler(step_rule="linear", tau0=0.2, window=2)
    for _ in range(100):
        s.update([1.0] * 4)
    assert s.tau == 0.8


def test_constant_step_is_capped_at_target():
    s = MedLocScheduler(step_rule="constant", constant_delta=0.25, window=2)
    taus = [s.tau for _ in range(20) if s.update([1.0] * 4)]
    assert taus == [0.55, 0.8]


def test_readiness_stages_follow_tau():
    s = MedLocScheduler(window=2, margin=0.0)
    s.tau = 0.75  # last stage: P 0.55, S 0.40
    for _ in range(2):
        s.entries.append((0.6, 0.9))
    assert s.ready()
    s.tau = 0.6  # middle stage: P 0.75
    assert not s.ready()


def test_state_dict_round_trip_mid_run():
    trace = [[0.95] * 8 if k % 7 else [0.95] * 7 + [0.1] for k in range(90)]
    full = MedLocScheduler()
    expected = [full.update(x) for x in trace]
    first = MedLocScheduler()
    got = [first.update(x) for x in trace[:37]]
    resumed = MedLocScheduler()
    resumed.load_state_dict(first.state_dict())
    got += [resumed.update(x) for x in trace[37:]]
    assert got == expected and resumed.tau == full.tau
    assert list(resumed.entries) == list(full.entries)


def test_fixed_and_raw_iou():
    f = FixedSchedule(0.5)
    assert not f.update([1.0]) and f.tau == 0.5
    assert RawIoUSchedule().tau is None


def test_staged_schedule_follows_progress_and_resumes():
    s = StagedSchedule([(0.0, 0.5), (0.5, 0.65), (0.75, 0.8)], total_steps=8)
    taus = []
    for _ in range(8):
        taus.append(s.tau)
        s.update([0.0])
    assert taus == [0.5, 0.5, 0.5, 0.5, 0.65, 0.65, 0.8, 0.8]
    # resumed with a larger --steps (a longer run): the stage bounds stay those of the first 8 steps
    t = StagedSchedule([(0.0, 0.5), (0.5, 0.65), (0.75, 0.8)], total_steps=20)
    t.load_state_dict(s.state_dict())
    assert (t.tau, t.step, t.total_steps) == (0.8, 8, 8)
    t.update([0.0])
    assert t.tau == 0.8  # not back to 0.65 at 9 / 20


def test_make_schedule_and_errors():
    assert isinstance(make_schedule("medloc", window=10), MedLocScheduler)
    assert make_schedule("fixed", tau=0.7).tau == 0.7
    assert make_schedule("raw-iou").tau is None
    assert make_schedule("stages", total_steps=3).tau == 0.5
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match="step_rule"):
        MedLocScheduler(step_rule="exp")
    with pytest.raises(ValueError, match="fraction 0"):
        StagedSchedule([(0.5, 0.7)])


def test_the_window_statistics_each_decision_saw_are_kept_for_the_log():
    s = MedLocScheduler(tau0=0.3, window=3)
    s.update([0.5, 0.2])  # hit rate 0.5, mean IoU 0.35
    s.update([0.4, 0.4])  # hit rate 1.0, mean IoU 0.40
    assert s.seen["r_bar"] == pytest.approx(0.75) and s.seen["sigma"] == pytest.approx(0.25)
    assert s.seen["m_bar"] == pytest.approx(0.375 - 0.3)
