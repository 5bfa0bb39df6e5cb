"""Where a run's numbers go besides metrics.jsonl (`--report-to tensorboard,wandb`): behind one small
interface, `Trackers`, called where metrics.jsonl is written. Nothing is imported unless asked for.

- TensorBoard: RUN/tensorboard/, every metrics.jsonl field as a scalar per step, the config as text,
  the evaluation, and every --log-samples-every steps a few sampled completions as images (the
  true box green, the predicted one red) and a text table. A resumed run writes into the same
  folder with the steps after its checkpoint purged, so no step is there twice.
- Weights & Biases: the same, the samples as a wandb.Table; its run id is kept in RUN/wandb_id so
  a resumed run continues the same W&B run. WANDB_MODE=offline works with no network (the run
  then lives in RUN/wandb/; `wandb sync` uploads it later). WANDB_PROJECT names the project.
Only rank 0 reports (train.py opens no tracker elsewhere).
"""
import importlib
import json
import os
import secrets

from PIL import ImageDraw

from files import RunError, first_line

KINDS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_report_to(text):
    """'none', or tracker names separated by commas -> the list of names (none: an empty list)."""
    names = [n.strip() for n in (text or "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ValueError(f"{text!r}: none, or one or more of tensorboard, wandb separated by commas")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # two writers of one tracker would show every step twice
        raise ValueError(f"{text!r}: {', '.join(twice)} named twice")
    return [n for n in names if n != "none"]


def problems(names, run_dir):
    """What would stop a tracker once the model is loaded, found before: TensorBoard that does not
    import or whose folder RUN/tensorboard is a file; W&B online (not WANDB_MODE=offline or
    disabled) without a login (no WANDB_API_KEY, no entry for its host in ~/.netrc)."""
    out = []
    if "tensorboard" in names:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as e:
            out.append(f"--report-to tensorboard: it does not import here ({first_line(e)}): pip install tensorboard")
        folder = os.path.join(run_dir or "", "tensorboard")
        if run_dir and os.path.exists(folder) and not os.path.isdir(folder):
            out.append(f"--report-to tensorboard: {folder} is a file; TensorBoard writes its events into that folder")
    if "wandb" in names and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun") \
            and not wandb_login():
        out.append("--report-to wandb: not logged in (no WANDB_API_KEY, no entry in ~/.netrc): run `wandb login`, "
                   "or set WANDB_MODE=offline and `wandb sync` the run later")
    return out


def wandb_login():
    """True when W&B has an API key: WANDB_API_KEY, or its host in the netrc file it reads."""
    import netrc
    from urllib.parse import urlparse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC", os.path.expanduser("~/.netrc"))).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def numbers(record, prefix=""):
    """The numeric fields of a record (nested dicts flattened with '/'), bools as 0 / 1."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and k != "step":
            out[prefix + k] = float(v)
    return out


def drawn(item):
    """A sampled completion's image with its true box (green) and predicted box (red) drawn."""
    img = item["sample"].image().copy()
    draw = ImageDraw.Draw(img)
    if getattr(item["sample"], "box", None):
        draw.rectangle(item["sample"].box, outline=(0, 255, 0), width=2)
    if item.get("box"):
        draw.rectangle(item["box"], outline=(255, 0, 0), width=2)
    return img


def caption(item):
    iou = f", IoU {item['iou']:.2f}" if "iou" in item else ""
    return f"{item['sample'].query} -> {item['text']!r} (reward {item['reward']:.2f}{iou})"


class TensorBoard:
    def __init__(self, run_dir, start_step, config, group):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        # purge_step: what an earlier session logged after the checkpoint this one resumes from is dropped
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def scalars(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def samples(self, step, items):
        import numpy as np
        for i, item in enumerate(items):
            self.writer.add_image(f"samples/{i}", np.asarray(drawn(item)), step, dataformats="HWC")
        self.writer.add_text("samples", "\n\n".join(caption(item) for item in items), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def run_name(run_dir, group):
    """The run's folder name; in a group (an ablate.py study: .../derm-s0/medloc), with its cell's."""
    parts = os.path.abspath(run_dir).split(os.sep)
    return "/".join(parts[-2:] if group else parts[-1:])


class WandB:
    cache_set = None  # the WANDB_CACHE_DIR this process set, if any

    def __init__(self, run_dir, start_step, config, group):
        try:
            import wandb
        except ImportError:
            raise RunError("--report-to wandb needs the wandb package: pip install wandb")
        # its service's logs inside the run too (W&B writes them under ~/.cache otherwise); a user's own
        # WANDB_CACHE_DIR stays, one set here for an earlier run of this process does not
        if os.environ.get("WANDB_CACHE_DIR") in (None, WandB.cache_set):
            WandB.cache_set = os.environ["WANDB_CACHE_DIR"] = os.path.join(os.path.abspath(run_dir), "wandb", "cache")
        self.wandb, id_path = wandb, os.path.join(run_dir, "wandb_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(8)  # W&B ids: letters and digits
            with open(id_path, "w") as f:
                f.write(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "medloc-r1"), id=run_id, resume="allow",
                              dir=run_dir, config=config, group=group, name=run_name(run_dir, group))

    def scalars(self, step, values):
        self.run.log(values, step=step)

    def samples(self, step, items):
        table = self.wandb.Table(columns=["image", "query", "completion", "reward", "iou"])
        for item in items:
            table.add_data(self.wandb.Image(drawn(item)), item["sample"].query, item["text"], item["reward"],
                           item.get("iou"))
        self.run.log({"samples": table}, step=step)

    def close(self):
        self.run.finish()


class Trackers:
    """The trackers a run reports to; with none, each call does nothing."""

    def __init__(self, names, run_dir, start_step, config, group=None):
        kinds = {"tensorboard": TensorBoard, "wandb": WandB}
        self.all = [kinds[n](run_dir, start_step, config, group) for n in names]

    def log(self, record):
        """One metrics.jsonl record (its step is record["step"])."""
        values = numbers(record)
        for t in self.all:
            t.scalars(record["step"], values)

    def log_eval(self, metrics, step):
        values = numbers(metrics, "eval/")
        for t in self.all:
            t.scalars(step, values)

    def log_samples(self, step, items):
        for t in self.all:
            t.samples(step, items)

    def close(self):
        for t in self.all:
            t.close()
