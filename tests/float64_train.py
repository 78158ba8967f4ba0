"""train.py in float64, for the tests that compare runs on 1 and N processes: in float64 the order of a sum moves
a result by about 1e-16 of its size, so those runs agree to a bound that holds on any CPU."""
import sys

import torch

import train

torch.set_default_dtype(torch.float64)
sys.argv[0] = "train.py"
train.cli()
