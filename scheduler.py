"""IoU-threshold schedules: MedLoc-R1's performance-aware curriculum and its baselines.

METHOD.md section 6. Every schedule has the same small interface:
  .tau                  current threshold (None for Raw-IoU: the reward is the IoU itself)
  .update(ious, hits=None) -> bool   called once per training step with the IoUs of all B*G
                        completions (with several boxes: their soft F1) and, with several boxes,
                        each one's F1 at tau (its hit; 1[IoU >= tau] with one box); True when tau changed
  .state_dict() / .load_state_dict(d)   so a resumed run continues with the same tau and window
"""
import math
from collections import deque

# METHOD.md section 6 defaults. Stages are (upper bound on tau, value): the first whose bound
# exceeds tau applies. P/S were not published (a third-party port's values).
PIECEWISE_STEPS = ((0.55, 0.15), (0.75, 0.10), (math.inf, 0.05))
READINESS_STAGES = ((0.60, 0.80, 0.20), (0.75, 0.75, 0.35), (math.inf, 0.55, 0.40))  # (bound, P, S)


def _stage(stages, tau):
    """The values of the first stage whose bound lies above tau."""
    return next(s[1:] for s in stages if tau < s[0])


def _as_floats(ious):
    return [float(v) for v in (ious.tolist() if hasattr(ious, "tolist") else ious)]


class MedLocScheduler:
    """Windowed multi-condition threshold tightening (METHOD.md section 6)."""

    def __init__(self, tau0=0.3, tau_target=0.8, window=30, margin=0.10, step_rule="piecewise",
                 piecewise_steps=PIECEWISE_STEPS, readiness_stages=READINESS_STAGES,
                 delta0=0.2, min_delta=0.05, constant_delta=0.15, use_reward=True,
                 use_stability=True, use_margin=True, keep_after_raise=None):
        if step_rule not in ("piecewise", "linear", "cosine", "constant"):
            raise ValueError(f"unknown step_rule {step_rule!r}: piecewise, linear, cosine or constant")
        if not 0 <= tau0 <= tau_target <= 1:
            raise ValueError(f"need 0 <= tau0 <= tau_target <= 1, got {tau0} and {tau_target}")
        if window < 2:
            raise ValueError(f"window must be at least 2 steps, got {window}")
        self.tau0, self.tau_target, self.window, self.margin = tau0, tau_target, window, margin
        self.step_rule, self.piecewise_steps = step_rule, tuple(piecewise_steps)
        self.readiness_stages = tuple(readiness_stages)
        self.delta0, self.min_delta, self.constant_delta = delta0, min_delta, constant_delta
        self.use_reward, self.use_stability, self.use_margin = use_reward, use_stability, use_margin
        # the paper's refresh keeps the newest N/2 entries (it beat a full and a quarter refresh)
        self.keep_after_raise = window // 2 if keep_after_raise is None else keep_after_raise
        self.tau = tau0
        self.entries = deque(maxlen=window)  # (hit rate, mean IoU) per training step
        self.seen = {}

    def delta(self, tau):
        """Step size delta(tau) of the chosen rule (METHOD.md section 6 table)."""
        if self.step_rule == "piecewise":
            return _stage(self.piecewise_steps, tau)[0]
        if self.step_rule == "constant":
            return self.constant_delta
        f = (tau - self.tau0) / (self.tau_target - self.tau0) if self.tau_target > self.tau0 else 1.0
        shrink = (1 - f) if self.step_rule == "linear" else (1 + math.cos(math.pi * f)) / 2
        return max(self.delta0 * shrink, self.min_delta)  # the floor makes tau_target reachable

    def readiness(self):
        """(r_bar, sigma, m_bar) of METHOD.md 6: mean and population std of hit rates, IoU margin."""
        rates = [r for r, _ in self.entries]
        r_bar = sum(rates) / len(rates)
        sigma = math.sqrt(sum((r - r_bar) ** 2 for r in rates) / len(rates))
        m_bar = sum(m for _, m in self.entries) / len(self.entries) - self.tau
        return r_bar, sigma, m_bar

    def ready(self):
        """METHOD.md 6: all enabled conditions r_bar >= P(tau), sigma <= S(tau), m_bar >= margin."""
        if len(self.entries) < self.window:
            return False
        r_bar, sigma, m_bar = self.readiness()
        P, S = _stage(self.readiness_stages, self.tau)
        return ((not self.use_reward or r_bar >= P) and (not self.use_stability or sigma <= S)
                and (not self.use_margin or m_bar >= self.margin))

    def update(self, ious, hits=None):
        """METHOD.md 6: record (hit rate at the current tau, mean IoU); raise tau when ready.
        `hits`: each completion's hit at the current tau when it is not 1[IoU >= tau] (several
        boxes: F1 at tau, with `ious` their soft F1)."""
        ious = _as_floats(ious)
        if not ious:
            raise ValueError("update() needs the IoUs of at least one completion")
        hit_rate = sum(v >= self.tau for v in ious) / len(ious) if hits is None else sum(_as_floats(hits)) / len(ious)
        self.entries.append((hit_rate, sum(ious) / len(ious)))
        P, S = _stage(self.readiness_stages, self.tau)  # what this decision saw and its bars (logged)
        self.seen = {**dict(zip(("r_bar", "sigma", "m_bar"), self.readiness())), "P": P, "S": S}
        if self.tau >= self.tau_target or not self.ready():
            return False
        # round so that stage bounds (0.55, 0.60, 0.75) and the target are not decided by float error
        self.tau = min(round(self.tau + self.delta(self.tau), 6), self.tau_target)
        for _ in range(len(self.entries) - self.keep_after_raise):
            self.entries.popleft()
        return True

    def state_dict(self):
        return {"tau": self.tau, "entries": [list(e) for e in self.entries]}

    def load_state_dict(self, state):
        self.tau = state["tau"]
        self.entries = deque((tuple(e) for e in state["entries"]), maxlen=self.window)


class FixedSchedule:
    """Constant tau: VLM-R1's original reward (METHOD.md section 6 baselines)."""

    def __init__(self, tau=0.5):
        self.tau = tau

    def update(self, ious, hits=None):
        return False

    def state_dict(self):
        return {"tau": self.tau}

    def load_state_dict(self, state):
        self.tau = state["tau"]


class RawIoUSchedule(FixedSchedule):
    """No threshold: the accuracy reward is the IoU itself (Raw-IoU baseline)."""

    def __init__(self):
        super().__init__(tau=None)


class StagedSchedule:
    """V-Triune style: tau set by training progress from (fraction_of_training, tau) stages."""

    def __init__(self, stages=((0.0, 0.5), (1 / 3, 0.65), (2 / 3, 0.8)), total_steps=100):
        self.stages = sorted((float(f), float(t)) for f, t in stages)
        if not self.stages or self.stages[0][0] > 0:
            raise ValueError(f"stages must start at fraction 0, got {stages}")
        self.total_steps, self.step = total_steps, 0
        self.tau = self.stages[0][1]

    def update(self, ious, hits=None):
        """Count the step; tau is the last stage whose fraction was reached (METHOD.md 6)."""
        self.step += 1
        old = self.tau
        progress = self.step / self.total_steps
        self.tau = [t for f, t in self.stages if f <= progress + 1e-9][-1]
        return self.tau != old

    def state_dict(self):
        return {"tau": self.tau, "step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, state):
        """The stage bounds stay those of the run's first --steps: extending a run with a larger
        --steps on resume continues the curriculum, it does not stretch it."""
        self.tau, self.step, self.total_steps = state["tau"], state["step"], state["total_steps"]


SCHEDULES = {"medloc": MedLocScheduler, "fixed": FixedSchedule, "raw-iou": RawIoUSchedule,
             "stages": StagedSchedule}


def make_schedule(name, **kwargs):
    """Schedule by CLI name: medloc, fixed, raw-iou or stages (METHOD.md section 6)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
