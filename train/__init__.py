"""Training of the T-KLVAE and the MTD on long videos (the training issue builds this stage)."""
