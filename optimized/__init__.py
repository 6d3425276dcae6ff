"""`deco.optimized`: the fast PyTorch implementation of DeCo (spec/), tested against `deco.reference`."""
