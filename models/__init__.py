"""PyTorch model definitions: T-KLVAE, Mask 3D-UNet, CLIP prompt encoder, and their checkpoint format."""
