"""Type aliases shared across modules."""

from __future__ import annotations

import os

import numpy as np
import torch

PathLike = str | os.PathLike
ArrayLike = np.ndarray | torch.Tensor
