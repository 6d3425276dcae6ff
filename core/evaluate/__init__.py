"""Evaluation: the digits score, the frequency spectra, ADM's FID suite and the sharded ADM
sample batch."""
