"""Model contracts on the tiny preset: shapes, paper initialisations, switches, checkpoints."""

import dataclasses

import pytest
import torch

from nuwaxl.config import PRESETS, SamplingDefaults, UNetConfig, VAEConfig, preset
from nuwaxl.errors import UserError
from nuwaxl.models.checkpoint import (
    NuwaModels,
    bundled_checkpoint,
    load_checkpoint,
    read_card,
    save_checkpoint,
    with_sampling,
)
from nuwaxl.models.layers import (
    TemporalAttention,
    TemporalConv,
    fused_projections,
    position_tables,
    temporal_attention_kernel,
    temporal_conv_layout,
)
from nuwaxl.models.unet import ConditionInjection, MaskUNet3D, SpaceTimeTransformer, matmul_epilogues
from nuwaxl.models.vae import TKLVAE

TINY = preset("tiny")
L, RES, LAT = 6, TINY.resolution, TINY.latent_size


def unet_inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, 4, LAT, LAT, generator=g)
    t = torch.tensor([999, 3][:b])
    ctx = torch.randn(b, L, 77, TINY.unet.context_dim, generator=g)
    cond = torch.randn(b, L, 4, LAT, LAT, generator=g)
    mask = torch.zeros(b, L, 1, LAT, LAT)
    mask[:, [0, -1]] = 1.0
    return x, t, ctx, cond, mask


def copy_shared(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Load all of src's weights into dst; returns dst's parameters left at their init (the temporal ones)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert missing and all(".temporal." in k for k in missing), missing
    return missing


@torch.no_grad()
def test_shapes():
    m = NuwaModels.random(TINY)
    video = torch.rand(2, L, 3, RES, RES) * 2 - 1
    mean, logvar = m.vae.encode(video)
    assert mean.shape == logvar.shape == (2, L, TINY.vae.latent_channels, LAT, LAT)
    assert m.vae.decode(mean).shape == video.shape
    assert m.unet(*unet_inputs()).shape == (2, L, 4, LAT, LAT)
    ids = m.tokenizer(["a red caveman", "x " * 200])
    assert ids.shape == (2, 77) and ids[1, -1] == m.tokenizer.eos
    assert m.text(ids).shape == (2, 77, TINY.text.hidden_size)


@torch.no_grad()
def test_tklvae_at_init_equals_image_klvae_exactly():
    """Eq. 1-2: identity temporal convs and zero-initialised temporal attention make T-KLVAE == KLVAE at init."""
    torch.manual_seed(0)
    video_vae = TKLVAE(TINY.vae)
    image_vae = TKLVAE(dataclasses.replace(TINY.vae, temporal=False))
    copy_shared(image_vae, video_vae)  # spatial weights shared, temporal ones left at their init
    video = torch.rand(2, L, 3, RES, RES) * 2 - 1
    m1, _ = video_vae.encode(video)
    m0, _ = image_vae.encode(video)
    assert torch.equal(m1, m0)
    assert torch.equal(video_vae.decode(m1), image_vae.decode(m0))
    # The check has teeth: a perturbed temporal conv changes the output.
    video_vae.encoder.conv_in.temporal.conv.weight.add_(0.1)
    assert not torch.equal(video_vae.encode(video)[0], m0)


@torch.no_grad()
def test_unet_temporal_layers_are_identity_at_init():
    torch.manual_seed(0)
    spatial = MaskUNet3D(dataclasses.replace(TINY.unet, temporal=False))
    full = MaskUNet3D(TINY.unet)
    copy_shared(spatial, full)
    inputs = unet_inputs()
    assert torch.equal(full(*inputs), spatial(*inputs))


@torch.no_grad()
def vae_with_temporal_weights() -> tuple[TKLVAE, torch.Tensor]:
    """A tiny T-KLVAE whose temporal convolutions are not the identity, and a video for it (seed 0)."""
    torch.manual_seed(0)
    vae = TKLVAE(TINY.vae).eval()
    for m in vae.modules():
        if isinstance(m, TemporalConv):
            m.conv.weight.normal_(std=0.1)
            m.conv.bias.normal_(std=0.1)
    return vae, torch.randn(1, L, 3, RES, RES)


def test_temporal_conv_layouts_compute_the_same_function():
    """"frames-as-height" (the layout ONNX Runtime's channels-last graphs are exported with) and "frames-as-matmul"
    are the same convolution as the Conv3d, with the same weights; the context puts every layer back."""
    vae, video = vae_with_temporal_weights()
    volume = vae.encode(video)[0]
    names = sorted(n for n, _ in vae.named_parameters())
    with temporal_conv_layout(vae, "frames-as-height"):
        rows = vae.encode(video)[0]
        assert any(n.endswith("frames_conv.weight") for n, _ in vae.named_parameters())
    assert sorted(n for n, _ in vae.named_parameters()) == names
    assert all(m.layout == "volume" for m in vae.modules() if isinstance(m, TemporalConv))
    torch.testing.assert_close(rows, volume, rtol=1e-5, atol=1e-5)
    with temporal_conv_layout(vae, "frames-as-matmul"):
        matmul = vae.encode(video)[0]
        assert any(n.endswith("frames_matrix") for n, _ in vae.named_parameters())
    assert sorted(n for n, _ in vae.named_parameters()) == names
    torch.testing.assert_close(matmul, volume, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frames-as-height"):
        with temporal_conv_layout(vae, "nhwc"):
            pass


@torch.no_grad()
def test_frames_as_matmul_exports_with_a_dynamic_batch():
    """The "frames-as-matmul" layout goes through torch.export (what AOTInductor packages compile) with the batch
    dynamic, and the exported program at another batch size computes the Conv3d's function."""
    vae, video = vae_with_temporal_weights()

    class Encode(torch.nn.Module):
        def forward(self, x):
            return vae.encode(x)[0]

    batch = torch.export.Dim("batch", min=2, max=4)  # as the engines' packages: a batch of 1 would be specialized
    with temporal_conv_layout(vae, "frames-as-matmul"):
        program = torch.export.export(Encode(), (torch.cat([video, -video]),), dynamic_shapes=({0: batch},))
    three = torch.cat([video, video.flip(1), -video])
    torch.testing.assert_close(program.module()(three), vae.encode(three)[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_aligned_convs_compute_the_same_function_with_channels_in_multiples_of_8():
    """The T-KLVAE's RGB and latent convolutions (and, frames-as-height, its temporal ones over 3 channels) run
    zero-padded to 8 channels inside the block, channels-last weights staying channels-last; encode and decode give
    the same outputs, and the modules are put back."""
    from nuwaxl.engine.torch_backend import channels_last_convs
    from nuwaxl.models.layers import PaddedConv2d, aligned_convs

    vae, video = vae_with_temporal_weights()
    with temporal_conv_layout(vae, "frames-as-height"):
        channels_last_convs(vae)  # as the packages are built: the (k, 1) convolutions too
        latents, _ = vae.encode(video)
        pixels = vae.decode(latents)
        names = sorted(n for n, _ in vae.named_parameters())
        with aligned_convs(vae, 8) as swapped:
            padded = [m for m in vae.modules() if isinstance(m, PaddedConv2d)]
            assert swapped == len(padded) >= 3  # encoder RGB in, decoder latent in and RGB out, temporal RGB
            assert all(m.weight.shape[0] % 8 == 0 and m.weight.shape[1] % 8 == 0 for m in padded)
            assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in padded)
            torch.testing.assert_close(vae.encode(video)[0], latents, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vae.decode(latents), pixels, rtol=1e-5, atol=1e-5)
        assert sorted(n for n, _ in vae.named_parameters()) == names
    assert not any(isinstance(m, PaddedConv2d) for m in vae.modules())


@torch.no_grad()
def temporal_attention_that_counts(module):
    """Temporal attention is a no-op at init (zero output projection, Eq. 2): random output weights make it count."""
    for m in module.modules():
        if isinstance(m, TemporalAttention):
            m.attn.to_out.weight.normal_(std=0.2)
    return module


@torch.no_grad()
def test_temporal_attention_kernels_compute_the_same_function():
    """The compiled engines' temporal attention ("math", "fused": attention over frames without gathering the
    tokens into sequences) gives the UNet's output, eagerly and compiled (Inductor, as AOTInductor compiles it);
    the context puts every layer back."""
    torch.manual_seed(0)
    unet = temporal_attention_that_counts(MaskUNet3D(TINY.unet).eval())
    x, t, ctx, cond, mask = unet_inputs()
    reference = unet(x, t, ctx, cond, mask)
    for kernel in ("math", "fused"):
        with temporal_attention_kernel(unet, kernel):
            torch.testing.assert_close(unet(x, t, ctx, cond, mask), reference, rtol=1e-4, atol=1e-4)
            compiled = torch.compile(unet, dynamic=False)(x, t, ctx, cond, mask)
            torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4)
            torch._dynamo.reset()
    assert all(m.kernel == "sdpa" for m in unet.modules() if isinstance(m, TemporalAttention))
    with pytest.raises(ValueError, match="fused"):
        with temporal_attention_kernel(unet, "flash"):
            pass


@torch.no_grad()
def test_fused_projections_compute_the_same_function():
    """Self-attention's q/k/v as one (3D, D) product (what every AOTInductor package compiles) gives the UNet's
    output with the "sdpa" and "math" temporal attention kernels, and the T-KLVAE's; cross-attention keeps its own
    projections; the context leaves the parameters as they were."""
    torch.manual_seed(0)
    unet = temporal_attention_that_counts(MaskUNet3D(TINY.unet).eval())
    x, t, ctx, cond, mask = unet_inputs()
    names = sorted(n for n, _ in unet.named_parameters())
    for kernel in ("sdpa", "math"):
        with temporal_attention_kernel(unet, kernel):
            reference = unet(x, t, ctx, cond, mask)
            with fused_projections(unet):
                fused = {n for n, _ in unet.named_parameters() if n.endswith(".qkv")}
                assert fused and not any("cross_attn" in n for n in fused)
                torch.testing.assert_close(unet(x, t, ctx, cond, mask), reference, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in unet.named_parameters()) == names
    vae, video = vae_with_temporal_weights()
    temporal_attention_that_counts(vae)
    reference = vae.encode(video)[0]
    with fused_projections(vae):
        torch.testing.assert_close(vae.encode(video)[0], reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_matmul_epilogues_compute_the_same_function():
    """The feed-forward's GELU and the two residual additions in the matrix products' epilogues (what every UNet
    package compiles) give the UNet's output, on row-major and channels-last hidden states; exact on the CPU, where
    `torch._addmm_activation` applies the exact GELU. Afterwards the blocks run their default again."""
    from nuwaxl.engine.torch_backend import channels_last_convs

    torch.manual_seed(0)
    unet = MaskUNet3D(TINY.unet).eval()
    for block in unet.modules():  # zero-initialised outputs would hide a lost residual or GELU
        if isinstance(block, SpaceTimeTransformer):
            for linear in (block.ff[2], block.proj_out):
                torch.nn.init.normal_(linear.weight, std=0.2)
    x, t, ctx, cond, mask = unet_inputs()
    for layout in ("rows", "channels-last"):
        if layout == "channels-last":
            channels_last_convs(unet)
        reference = unet(x, t, ctx, cond, mask)
        for epilogues in ("gelu", "gelu-residual"):
            with matmul_epilogues(unet, epilogues) as blocks:
                assert blocks and all(b.epilogues == epilogues for b in blocks)
                torch.testing.assert_close(unet(x, t, ctx, cond, mask), reference, rtol=1e-5, atol=1e-5)
        assert all(b.epilogues == "none" for b in blocks)
    with pytest.raises(ValueError, match="unknown SpaceTimeTransformer epilogues 'bias'"):
        with matmul_epilogues(unet, "bias"):
            pass


@torch.no_grad()
def test_position_tables_compute_the_same_function():
    """The frame position encoding read from a precomputed table (`position_tables`, a candidate for the packages)
    gives the UNet's output with the "sdpa" and "math" temporal kernels; the table is really read (zeroed, the output
    changes) and must match the frame count; afterwards no buffer is left and the state dict is unchanged."""
    torch.manual_seed(0)
    unet = MaskUNet3D(TINY.unet).eval()
    for m in unet.modules():  # zero-initialised temporal outputs (Eq. 2) would hide the position encoding
        if isinstance(m, TemporalAttention):
            torch.nn.init.normal_(m.attn.to_out.weight, std=0.2)
    x, t, ctx, cond, mask = unet_inputs()
    keys = sorted(unet.state_dict())
    for kernel in ("sdpa", "math"):
        with temporal_attention_kernel(unet, kernel):
            reference = unet(x, t, ctx, cond, mask)
            with position_tables(unet, L) as found:
                assert found
                assert sorted(unet.state_dict()) == keys  # non-persistent: checkpoints do not see it
                torch.testing.assert_close(unet(x, t, ctx, cond, mask), reference, rtol=1e-5, atol=1e-5)
                for m in found:
                    m.position_table.zero_()
                assert not torch.allclose(unet(x, t, ctx, cond, mask), reference, atol=1e-4)
    assert not any("position_table" in dict(m.named_buffers()) for m in unet.modules())
    with position_tables(unet, L + 1), pytest.raises(ValueError, match=f"position table for {L + 1} frames"):
        unet(x, t, ctx, cond, mask)


@torch.no_grad()
def test_condition_injection_is_noop_at_init():
    torch.manual_seed(0)
    unet = MaskUNet3D(TINY.unet)
    x, t, ctx, cond, mask = unet_inputs()
    reference = unet(x, t, ctx, torch.zeros_like(cond), torch.zeros_like(mask))
    assert torch.equal(unet(x, t, ctx, cond, mask), reference)
    for module in unet.modules():  # once trained (non-zero), the condition matters
        if isinstance(module, ConditionInjection):
            torch.nn.init.normal_(module.cond.weight, std=0.1)
    assert not torch.allclose(unet(x, t, ctx, cond, mask), reference)


def injection_sites(cfg: UNetConfig) -> dict[str, set[int]]:
    unet = MaskUNet3D(cfg)
    sites = {"down": set(), "up": set(), "mid": set()}
    for i, layers in enumerate(unet.down):
        sites["down"] |= {i for layer in layers if layer.inject is not None}
    for k, layers in enumerate(unet.up):
        sites["up"] |= {len(unet.up) - 1 - k for layer in layers if layer.inject is not None}
    sites["mid"] = {0 for layer in unet.mid if layer.inject is not None}
    return sites


def test_folded_injection_equals_eq_10_and_11():
    """The per-call scale/shift precomputation is the paper's two injections, exactly (up to rounding)."""
    torch.manual_seed(0)
    inj = ConditionInjection(8, 6)
    for conv in (inj.cond, inj.mask):
        torch.nn.init.normal_(conv.weight, std=0.5)
        torch.nn.init.normal_(conv.bias, std=0.5)
    h, cond, mask = torch.randn(3, 8, 4, 4), torch.randn(3, 6, 4, 4), (torch.rand(3, 1, 4, 4) > 0.5).float()
    w_c, b_c = inj.cond(cond).chunk(2, dim=1)
    h1 = w_c * h + b_c + h  # Eq. 10
    w_m, b_m = inj.mask(mask).chunk(2, dim=1)
    torch.testing.assert_close(inj(h, cond, mask), w_m * h1 + b_m + h1, rtol=1e-5, atol=1e-5)  # Eq. 11


def test_prepared_step_equals_the_whole_network():
    """prepare once + step per denoising step == forward, with every injection and attention weight non-zero."""
    torch.manual_seed(0)
    cfg = preset("tiny").unet
    unet = MaskUNet3D(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, cond = torch.randn(2, 4, cfg.latent_channels, 4, 4), torch.randn(2, 4, cfg.latent_channels, 4, 4)
    mask = torch.zeros(2, 4, 1, 4, 4)
    mask[:, [0, -1]] = 1.0
    context = torch.randn(2, 4, 5, cfg.context_dim)
    with torch.no_grad():
        prepared = unet.prepare(context, cond, mask)
        assert len(prepared) == sum(layer.num_prepared for layer, _ in unet.layers()) > 0
        for t in (999, 500, 3):
            ts = torch.full((2,), t)
            torch.testing.assert_close(unet.step(x, ts, prepared), unet(x, ts, context, cond, mask))
        other = unet.prepare(context, torch.randn_like(cond), mask)  # the conditions do reach the step
        assert (unet.step(x, ts, other) - unet.step(x, ts, prepared)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="prepared tensors given"):
            unet.step(x, ts, prepared[:-1])


def test_multiscale_and_symmetric_injection_switches():
    cfg = TINY.unet
    assert injection_sites(cfg) == {"down": {0, 1}, "up": {0, 1}, "mid": {0}}
    no_mi = injection_sites(dataclasses.replace(cfg, inject_multiscale=False))
    assert no_mi == {"down": {0}, "up": {0}, "mid": set()}
    no_si = injection_sites(dataclasses.replace(cfg, inject_symmetric=False))
    assert no_si == {"down": set(), "up": {0, 1}, "mid": set()}


def test_paper_preset_on_meta_device_is_about_one_billion():
    with torch.device("meta"):
        m = NuwaModels(PRESETS["paper"])
    counts = m.num_parameters()
    assert 0.95e9 < counts["unet"] < 1.2e9, counts
    assert next(m.unet.parameters()).device.type == "meta"


def test_checkpoint_round_trip(tmp_path):
    m = NuwaModels.random(TINY, seed=3)
    path = save_checkpoint(m, tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == m.config and loaded.tokenizer.json == m.tokenizer.json
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    half = load_checkpoint(save_checkpoint(m, tmp_path / "half.safetensors", dtype=torch.float16))
    assert next(half.unet.parameters()).dtype == torch.float16


def test_checkpoint_carries_its_sampling_defaults(tmp_path):
    m = NuwaModels.random(TINY, seed=3)
    plain = save_checkpoint(m, tmp_path / "plain.safetensors", dtype=torch.float16)
    assert read_card(plain).sampling == SamplingDefaults() and SamplingDefaults().guidance_scale == 1.0
    tuned = with_sampling(plain, tmp_path / "tuned.safetensors", guidance_scale=2.5)
    assert read_card(tuned).sampling.guidance_scale == 2.5 and load_checkpoint(tuned).sampling.guidance_scale == 2.5
    a, b = load_checkpoint(plain), load_checkpoint(tuned)  # same weights, same dtype
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert next(b.parameters()).dtype == torch.float16
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"guidance_scale={bad} must be a finite number >= 1"):
            with_sampling(plain, tmp_path / "bad.safetensors", guidance_scale=bad)
    with pytest.raises(UserError, match="guidance_scale='3' must be a finite number >= 1"):
        SamplingDefaults.from_dict({"guidance_scale": "3"})
    with pytest.raises(UserError, match=r"unknown sampling defaults \['temperature'\]"):
        SamplingDefaults.from_dict({"temperature": 2.0})


def test_bundled_weights_recommend_guidance_and_record_their_training():
    card = read_card(bundled_checkpoint())
    assert card.sampling.guidance_scale > 1.0  # chosen by benchmarks/quality.py
    assert card.trained_on.trained and card.trained_on.resolution == 64
    assert {"fred", "dino", "walks", "quarry", "campfire"} <= set(card.trained_on.words)


def test_training_record_round_trips_and_random_weights_say_so(tmp_path):
    from nuwaxl.config import TrainingRecord

    path = save_checkpoint(NuwaModels.random(TINY), tmp_path / "random.safetensors")
    assert not read_card(path).trained_on.trained  # random initialisation, saved: still random weights
    record = TrainingRecord(True, 32, ("a", "cat"))
    tagged = with_sampling(path, tmp_path / "tagged.safetensors", trained_on=record)
    assert read_card(tagged).trained_on == record and load_checkpoint(tagged).trained_on == record


def test_random_weights_are_deterministic():
    a, b = NuwaModels.random(TINY, seed=1), NuwaModels.random(TINY, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(corrupt)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="no trt-nuwaxl config"):
        load_checkpoint(foreign)
    good = save_checkpoint(NuwaModels.random(TINY), tmp_path / "good.safetensors")
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="truncated.safetensors is not a readable safetensors file"):
        load_checkpoint(truncated)


def test_config_errors_name_value_and_fix():
    with pytest.raises(UserError, match="36 px is not divisible by the VAE factor 8; use a multiple of 8"):
        TINY.with_resolution(36)
    with pytest.raises(UserError, match="norm_groups"):
        dataclasses.replace(TINY, vae=VAEConfig(channels=(8, 12), norm_groups=8))


def test_temporal_conv_equals_a_3d_convolution_over_frames():
    """TemporalConv runs as a (k,1) 2-D convolution for speed; it must compute the (k,1,1) 3-D one (Eq. 1 layer)."""
    from nuwaxl.models.layers import TemporalConv

    torch.manual_seed(0)
    layer = TemporalConv(8)
    torch.nn.init.normal_(layer.conv.weight)
    torch.nn.init.normal_(layer.conv.bias)
    x = torch.randn(2 * 5, 8, 3, 4)  # (B*L, C, H, W) with B=2, L=5
    x5 = x.reshape(2, 5, 8, 3, 4).transpose(1, 2)  # (B, C, L, H, W)
    ref = torch.nn.functional.conv3d(x5, layer.conv.weight, layer.conv.bias, padding=(1, 0, 0))
    torch.testing.assert_close(layer(x, 5), ref.transpose(1, 2).reshape(10, 8, 3, 4), atol=1e-5, rtol=1e-5)
