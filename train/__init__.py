"""Training of the T-KLVAE and the MTD on long videos: the procedural dataset (`data`) and the sparse hierarchical
sampling of training clips (`sampling`) so far; the training loops are the rest of the training issue."""
