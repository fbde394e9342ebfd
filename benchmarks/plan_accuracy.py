"""How close `qdylora plan`'s activation estimate is to what autograd really keeps, on CPU.

    python benchmarks/plan_accuracy.py

For tiny Llama and Falcon models (qdylora.testing, 4-bit, LoRA r 8 on every linear, fp32) and a
few batch x sequence shapes, with and without gradient checkpointing: the planner's activation
row next to the peak of saved-for-backward bytes measured with `SavedTensorMeter` during a real
forward + backward (reentrant checkpointing, whose recomputation the meter can see). Llama's
SDPA call runs PyTorch's fused CPU kernel; Falcon's (masked) runs the math kernel, planned as
`attention="math"`. Weights, adapter, gradients and optimizer rows are exact (tests/test_plan.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def main() -> None:
    from qdylora.plan import measured_activation_bytes, plan
    from qdylora.testing import make_tiny_model

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    print(f"{'model':<8}{'attention':<10}{'ckpt':<6}{'batch x seq':>12}{'plan KiB':>11}{'measured KiB':>14}{'error':>9}")
    for arch, attention in (("llama", "fused"), ("falcon", "math")):
        path = make_tiny_model(tmp / arch, arch)
        for gc in (False, True):
            for batch, seq in ((1, 32), (2, 48), (4, 128)):
                measured = measured_activation_bytes(path, 8, batch, seq, gc)
                est = plan(path, r_max=8, batch=batch, seq=seq, compute_dtype="float32", gradient_checkpointing=gc,
                           attention=attention).row("activations")
                print(f"{arch:<8}{attention:<10}{'on' if gc else 'off':<6}{f'{batch} x {seq}':>12}{est / 1024:>11.1f}"
                      f"{measured / 1024:>14.1f}{est / measured - 1:>+9.1%}", flush=True)


if __name__ == "__main__":
    main()
