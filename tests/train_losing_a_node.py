"""train.py with a node that dies or hangs, for the tests of lost ranks and restarts
(tests/test_multinode.py launches this file under torchrun instead of train.py).

MEDLOC_TEST_KILL=STEP:RANK kills that rank (SIGKILL, as a node dies) right after checkpoint STEP
is written, in the first attempt only; STEP:RANK:STOP freezes it instead (SIGSTOP, as a hung node).
The hook wraps train.save_checkpoint from outside, so train.py itself carries no test code.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dist  # noqa: E402
import train  # noqa: E402

save_checkpoint = train.save_checkpoint


def save_then_fail(run, run_dir, step):
    save_checkpoint(run, run_dir, step)
    at = os.environ.get("MEDLOC_TEST_KILL", "").split(":")
    if dist.attempt() == 0 and at[:2] == [str(step), str(dist.rank())]:
        os.kill(os.getpid(), signal.SIGSTOP if at[2:] == ["STOP"] else signal.SIGKILL)


train.save_checkpoint = save_then_fail

if __name__ == "__main__":
    train.main()
