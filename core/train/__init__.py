"""Training runs: the run settings (`run_config`), the job that trains, samples and checkpoints
(`job`), the memory check before a run allocates (`memory`) and REPA's frozen DINOv2 (`repa`)."""
