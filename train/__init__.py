"""Training of the T-KLVAE and the MTD on long videos (paper sections 3.1-3.3): the procedural dataset (`data`),
user videos with per-frame captions (`videos`), the sparse hierarchical sampling of training clips (`sampling`), the
three-stage trainer (`trainer`, `trt-nuwaxl train`) and the evaluation with a frame probe (`evaluate`,
`trt-nuwaxl eval`)."""
