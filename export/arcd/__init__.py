"""ARCD offline side: anomaly simulation, networks, losses, data, two-stage training.

See ``shared/seeds/004_spec.md`` §2 for the method; ``export.onnx_export`` turns a training run
into a runtime bundle.
"""

import os as _os

# Training shares a small CPU with other work. With OpenMP's default active wait, torch's idle
# threads spin on a busy 2-core machine and a training step ran 4-5x slower than with one
# thread; passive waiting keeps two threads at least as fast as one. It must be set before torch
# loads its OpenMP runtime, hence here; an explicit setting in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
