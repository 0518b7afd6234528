"""Runtime: plan the tree of diffusion calls, schedule them in batches, run them on an engine, write the video."""
