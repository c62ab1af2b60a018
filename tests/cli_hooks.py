"""vicuna_mi.py with test hooks, for faults that cannot be produced from outside:
TEST_CRASH_AFTER_LAYER=k ends the process hard (exit code 17, no cleanup) right after layer
k's checkpoint is on disk; TEST_PAUSE_BEFORE_LAYER=k prints "paused" and sleeps as layer k
starts, so that a test can interrupt the run there. Without either it is vicuna_mi.py."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint  # noqa: E402
import compress  # noqa: E402
import vicuna_mi  # noqa: E402

crash_after = os.environ.get("TEST_CRASH_AFTER_LAYER")
pause_before = os.environ.get("TEST_PAUSE_BEFORE_LAYER")
save_layer, compress_layer = checkpoint.Checkpointer.save_layer, compress.compress_layer


def crashing_save_layer(self, i, *args, **kwargs):
    save_layer(self, i, *args, **kwargs)
    if str(i) == crash_after:
        os._exit(17)


def pausing_compress_layer(team, index, *args, **kwargs):
    if str(index) == pause_before:
        print("paused", flush=True)
        time.sleep(120)
    return compress_layer(team, index, *args, **kwargs)


checkpoint.Checkpointer.save_layer = crashing_save_layer
compress.compress_layer = pausing_compress_layer
sys.exit(vicuna_mi.main())
