"""Export, parity, engine directories and backends on the tiny preset (CPU).

Builds run once per session: ONNX Runtime fp32 and TensorRT fp16 (tensorrt-rtx builds plans without a GPU);
AOTInductor packages are in test_aoti.py, a file of their own so that pytest-xdist runs their long compile beside
these. TensorRT *execution* needs a GPU the installed TensorRT supports and skips otherwise.
"""

import json
import shutil

import onnx
import pytest
import torch
from conftest import MAX_ROWS, assert_engines_match_pytorch, quiet

from nuwaxl.build import build
from nuwaxl.cli import main
from nuwaxl.config import ModelConfig, preset
from nuwaxl.engine import tensorrt_backend
from nuwaxl.engine.directory import load_engines, read_manifest
from nuwaxl.errors import UserError
from nuwaxl.export.parity import TOLERANCE
from nuwaxl.iospec import NETWORKS, IOSpec, io_specs

TRT = tensorrt_backend.status()
needs_trt_build = pytest.mark.skipif(not TRT["can_build"], reason=str(TRT["why_not_build"]))


@pytest.fixture(scope="session")
def ort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "ort"
    build(out, "onnxruntime", "fp32", MAX_ROWS, preset_name="tiny", device="cpu", progress=False, log=quiet)
    return out


@pytest.fixture(scope="session")
def trt_dir(tmp_path_factory):
    if not TRT["can_build"]:
        pytest.skip(TRT["why_not_build"])
    out = tmp_path_factory.mktemp("engines") / "trt"
    build(out, "tensorrt", "fp16", MAX_ROWS, preset_name="tiny", device="cpu", progress=False, log=quiet)
    return out


def expected_specs(directory):
    m = read_manifest(directory)
    return io_specs(ModelConfig.from_dict(m["model_config"]), m["precision"], MAX_ROWS, m["frames_per_call"])


@pytest.mark.parametrize("which", ["ort_dir", "trt_dir"])
def test_onnx_export_and_parity_for_each_network(which, request):
    d = request.getfixturevalue(which)
    m = read_manifest(d)
    for name in NETWORKS:
        man = json.loads((d / "onnx" / f"{name}.json").read_text())
        parity = man["parity"]
        assert parity["passed"] and parity["tolerance"] == TOLERANCE[m["precision"]]
        assert set(parity["batches"]) == {"1", str(MAX_ROWS)}  # min and opt/max batch
        assert parity["worst_rel_err"] <= TOLERANCE[m["precision"]]
        assert m["weights"] == {"source": "preset:tiny", "seed": 0, "sha256": None}  # recorded, not copied
        assert "enable_cuda_graph" in m["cuda_graphs"] or "execute_async_v3" in m["cuda_graphs"]
        assert not (d / "checkpoint.safetensors").exists() and len(man["source_checkpoint_sha256"]) == 64
        assert man["opset"] == 18 and {"torch", "onnx", "onnxscript"} <= set(man["versions"])
        assert IOSpec.from_dict(man["io_spec"]) == expected_specs(d)[name]
        graph = onnx.load(str(d / "onnx" / f"{name}.onnx"), load_external_data=False).graph
        spec = expected_specs(d)[name]
        assert [i.name for i in graph.input] == [t.name for t in spec.inputs]
        for i, t in zip(graph.input, spec.inputs, strict=True):
            dims = [dim.dim_param or dim.dim_value for dim in i.type.tensor_type.shape.dim]
            assert dims == list(t.shape), (name, dims, t.shape)


def test_onnxruntime_graphs_fuse_attention_where_measured_and_tensorrt_graphs_never(ort_dir, trt_dir):
    """ONNX Runtime's unet_step runs its attention as the fused contrib op (and passed parity above); TensorRT's
    parser does not know that op, so its ONNX keeps standard attention."""
    from nuwaxl.engine.onnxruntime_backend import FUSED_ATTENTION

    def ops(d, name):
        return {n.op_type for n in onnx.load(str(d / "onnx" / f"{name}.onnx"), load_external_data=False).graph.node}

    for name in NETWORKS:
        fused = "MultiHeadAttention" in ops(ort_dir, name)
        assert fused == (name in FUSED_ATTENTION), name
        assert json.loads((ort_dir / "onnx" / f"{name}.json").read_text())["attention"] == \
            ("com.microsoft.MultiHeadAttention" if fused else "onnx")
        assert "MultiHeadAttention" not in ops(trt_dir, name)
    assert "Softmax" in ops(trt_dir, "unet_step")


def test_onnxruntime_unet_fusions_turn_every_group_norm_into_its_fused_op(ort_dir, tmp_path):
    """CUDA builds rewrite unet_step with ONNX Runtime's optimizer (fused ops without CPU kernels: checked here as a
    graph; the GPU build's parity gate runs it). Every GroupNorm of the exported graph (InstanceNormalization in the
    decomposition) becomes GroupNorm / SkipGroupNorm, SiLU folded in where it follows; fp16 I/O as the spec says.
    A CPU build keeps the exported graph."""
    from nuwaxl.engine.onnxruntime_backend import GRAPH_FUSIONS, fuse_graph

    src = ort_dir / "onnx" / "unet_step.onnx"
    plain = onnx.load(str(src)).graph
    norms = sum(n.op_type == "InstanceNormalization" for n in plain.node)
    assert norms > 0 and "fused_ops" not in json.loads((ort_dir / "onnx" / "unet_step.json").read_text())
    facts = fuse_graph(src, tmp_path / "unet_step.onnx", GRAPH_FUSIONS["unet_step"], fp16=True)
    graph = onnx.load(str(tmp_path / "unet_step.onnx")).graph
    fused = [n for n in graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm")]
    assert len(fused) == norms == facts["fused_ops"].get("GroupNorm", 0) + facts["fused_ops"].get("SkipGroupNorm", 0)
    assert not any(n.op_type == "InstanceNormalization" for n in graph.node)
    silu = [a.i for n in fused for a in n.attribute if a.name == "activation"]
    assert 0 < sum(silu) < len(fused)  # ResBlock norms are followed by SiLU, the transformers' are not
    assert facts["fused_ops"].get("NhwcConv", 0) > 0
    spec = expected_specs(ort_dir)["unet_step"]
    fp16 = onnx.TensorProto.FLOAT16
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == \
        [(t.name, onnx.TensorProto.INT64 if t.dtype == "int64" else fp16) for t in spec.inputs]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [fp16]


@pytest.mark.parametrize("name", ["vae_encoder", "vae_decoder"])
def test_onnxruntime_vae_fusions_turn_every_group_norm_into_its_fused_op(ort_dir, tmp_path, name):
    from nuwaxl.engine.onnxruntime_backend import GRAPH_FUSIONS, fuse_graph

    src = ort_dir / "onnx" / f"{name}.onnx"
    norms = sum(n.op_type == "InstanceNormalization" for n in onnx.load(str(src)).graph.node)
    facts = fuse_graph(src, tmp_path / f"{name}.onnx", GRAPH_FUSIONS[name], fp16=True)
    ops = [n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]
    assert norms > 0 and ops.count("GroupNorm") + ops.count("SkipGroupNorm") == norms
    assert "InstanceNormalization" not in ops and facts["fused_ops"].get("NhwcConv", 0) > 0


@pytest.mark.parametrize("name", ["unet_step", "vae_decoder"])
def test_fused_exports_keep_temporal_convs_and_self_attention_channels_last(tmp_path, name):
    """A CUDA build's export (`export_fused`: temporal convolutions "frames-as-height", self-attention keys and values
    handed to MultiHeadAttention unsplit): every convolution becomes NhwcConv, no 5-D transpose is left, and no key
    or value of the fused attention comes out of a Transpose. Fails if the export goes back to the Conv3d between
    transposes or to split keys (transposes were 13% of the fused paper step before)."""
    import copy

    from nuwaxl.engine.onnxruntime_backend import FUSED_ATTENTION, GRAPH_FUSIONS, export_fused
    from nuwaxl.export.onnx_export import ort_attention, sample_inputs
    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.layers import TemporalConv
    from nuwaxl.models.networks import networks

    config = preset("tiny")
    module = networks(NuwaModels.random(config, seed=0))[name].eval()
    spec = io_specs(config, "fp32", MAX_ROWS)[name]
    sample = sample_inputs(spec, 2, torch.device("cpu"), torch.float32, config.text.vocab_size,
                           torch.Generator().manual_seed(1))
    dst = tmp_path / f"{name}.onnx"
    facts = export_fused(copy.deepcopy(module), spec, dst, sample,
                         ort_attention() if name in FUSED_ATTENTION else None, GRAPH_FUSIONS[name], fp16=True)
    graph = onnx.load(str(dst)).graph
    made = {o: n for n in graph.node for o in n.output}
    temporal = sum(isinstance(m, TemporalConv) for m in module.modules())
    convs = [n.op_type for n in graph.node if n.op_type in ("Conv", "NhwcConv")]
    assert temporal > 0 and facts["temporal_conv"] == "frames-as-height"
    assert set(convs) == {"NhwcConv"} and len(convs) == facts["fused_ops"]["NhwcConv"] > temporal
    perms = [[a.ints for a in n.attribute if a.name == "perm"][0] for n in graph.node if n.op_type == "Transpose"]
    assert perms and all(len(p) < 5 for p in perms)
    attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == facts["fused_ops"].get("MultiHeadAttention", 0)
    assert (len(attention) > 0) == (name in FUSED_ATTENTION)
    for n in attention:
        for kv in n.input[1:3]:
            assert kv not in made or made[kv].op_type != "Transpose", n.name


def test_onnxruntime_sessions_on_a_gpu_run_on_one_thread_whoever_calls(monkeypatch):
    """ONNX Runtime's CUDA provider keeps captured graphs per calling thread; the engine hands every run to its own
    thread (`OrtEngine.runner`), so callers on any thread share one set of graphs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nuwaxl.engine.onnxruntime_backend import OrtEngine

    ran_on = set()

    class Session:
        def run_with_iobinding(self, binding, options):
            ran_on.add(threading.get_ident())

    class Stream:
        def wait_stream(self, other):
            pass

    engine = OrtEngine.__new__(OrtEngine)
    engine.session, engine.stream, engine.device = Session(), Stream(), torch.device("cuda")
    engine.runner = ThreadPoolExecutor(1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    callers = [threading.Thread(target=engine._on_stream, args=(None, None, [])) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=10)
    engine._on_stream(None, None, [])
    assert len(ran_on) == 1 and threading.get_ident() not in ran_on and \
        not ran_on & {t.ident for t in callers}


def test_repeated_identical_casts_are_dropped_and_others_kept():
    """ONNX Runtime 1.31's float16 tool gives one Resize `scales` value read by two Resize nodes two identical Casts
    (same node and output name), a graph ONNX Runtime refuses to load."""
    from onnx import TensorProto, helper

    from nuwaxl.engine.onnxruntime_backend import _drop_repeated_casts

    cast = helper.make_node("Cast", ["s"], ["s_fp32"], name="s_cast", to=TensorProto.FLOAT)
    nodes = [cast, helper.make_node("Resize", ["x", "", "s_fp32"], ["y1"]),
             helper.make_node("Cast", ["s"], ["s_fp32"], name="s_cast", to=TensorProto.FLOAT),
             helper.make_node("Resize", ["x", "", "s_fp32"], ["y2"]),
             helper.make_node("Cast", ["s"], ["s_fp16"], name="s_cast16", to=TensorProto.FLOAT16)]
    graph = helper.make_graph(nodes, "g", [], [])
    _drop_repeated_casts(graph)
    assert [(n.op_type, n.output[0]) for n in graph.node] == [("Cast", "s_fp32"), ("Resize", "y1"), ("Resize", "y2"),
                                                               ("Cast", "s_fp16")]


def test_parity_numbers_are_fp32_tight_and_fp16_loose(ort_dir, trt_dir):
    fp32 = json.loads((ort_dir / "onnx" / "unet_step.json").read_text())["parity"]["worst_rel_err"]
    fp16 = json.loads((trt_dir / "onnx" / "unet_step.json").read_text())["parity"]["worst_rel_err"]
    assert fp32 < 1e-5 < fp16 < 2e-2


@needs_trt_build
def test_tensorrt_plans_match_the_spec(trt_dir):
    specs = expected_specs(trt_dir)
    trt_dtype = {"float16": "HALF", "float32": "FLOAT", "int64": "INT64"}
    for name in NETWORKS:
        rec = json.loads((trt_dir / "tensorrt" / f"{name}.json").read_text())  # as read back from TensorRT
        spec = specs[name]
        for got, want in ((rec["inputs"], spec.inputs), (rec["outputs"], spec.outputs)):
            assert [(t["name"], t["dtype"]) for t in got] == [(t.name, trt_dtype[t.dtype]) for t in want]
            assert [t["shape"] for t in got] == [[-1 if d == "batch" else d for d in t.shape] for t in want]
        assert rec["profile"] == {k: [list(s) for s in v] for k, v in spec.profile().items()}
        assert rec["precision"] == "fp16" and rec["plan_bytes"] > 0 and rec["library"] == TRT["library"]
        assert rec["built_with"].startswith("polygraphy ")  # polygraphy's loaders built it, for either library


def test_parity_gate_compares_runners_through_polygraphy(ort_dir):
    """The gate passes the ONNX Runtime engine and fails the same engine with one output off by 5%."""
    from nuwaxl.engine.onnxruntime_backend import OrtEngine
    from nuwaxl.engine.stage import BuildJob
    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.networks import networks

    m = read_manifest(ort_dir)
    config = ModelConfig.from_dict(m["model_config"])
    spec = expected_specs(ort_dir)["unet_prepare"]
    reference = networks(NuwaModels.random(config, seed=0))["unet_prepare"]
    engine = OrtEngine(ort_dir / "onnx" / "unet_prepare.onnx", spec, torch.device("cpu"))
    job = BuildJob(ort_dir, "fp32", torch.device("cpu"), "w", config, config.frames_per_call,
                   {"unet_prepare": [1, 3]}, False, quiet)

    def off(feeds):
        out = engine.run(feeds)
        return {**out, "k_1": out["k_1"] * 1.05}

    good = job.measure_parity("unet_prepare", engine.run, reference, spec, torch.device("cpu"), "ort")
    bad = job.measure_parity("unet_prepare", off, reference, spec, torch.device("cpu"), "ort-off")
    assert good["passed"] and good["compared_with"] == "polygraphy Comparator" and set(good["batches"]) == {"1", "3"}
    assert good["worst_rel_err"] < TOLERANCE["fp32"]
    assert not bad["passed"] and bad["batches"]["1"]["output"] == "k_1" and bad["worst_rel_err"] > 0.02


def test_every_backend_module_speaks_the_registry_protocol():
    from nuwaxl.engine.registry import BACKENDS, backend_module

    for name in BACKENDS:
        module = backend_module(name)
        for attr in ("status", "doctor", "check_build", "build_network", "files", "load"):
            assert callable(getattr(module, attr)), (name, attr)
        assert isinstance(module.CUDA_GRAPHS, str) and module.CUDA_GRAPHS
        rows = module.doctor(False)
        assert rows and all(set(r) == {"usable", "why", "cuda_graphs"} for r in rows.values())


@needs_trt_build
def test_tensorrt_cache_key_rebuilds_only_on_change(trt_dir, ort_dir, tmp_path):
    from nuwaxl.export.onnx_export import onnx_sha256

    spec = expected_specs(trt_dir)["text_encoder"]
    onnx16 = trt_dir / "onnx" / "text_encoder.onnx"
    plan = tmp_path / "text_encoder.plan"
    sha = onnx_sha256(onnx16)
    assert not tensorrt_backend.build_plan(onnx16, sha, spec, "fp16", plan)["reused"]
    assert tensorrt_backend.build_plan(onnx16, sha, spec, "fp16", plan)["reused"]  # same inputs: no rebuild
    wider = IOSpec(spec.network, spec.inputs, spec.outputs, 1, 8, 8)
    rebuilt = tensorrt_backend.build_plan(onnx16, sha, wider, "fp16", plan)
    assert not rebuilt["reused"] and rebuilt["profile"]["input_ids"][2] == [8, 77]  # changed profile
    onnx32 = ort_dir / "onnx" / "text_encoder.onnx"  # changed ONNX (other weights dtype)
    spec32 = expected_specs(ort_dir)["text_encoder"]
    wider32 = IOSpec(spec32.network, spec32.inputs, spec32.outputs, 1, 8, 8)
    assert not tensorrt_backend.build_plan(onnx32, onnx_sha256(onnx32), wider32, "fp32", plan)["reused"]


@needs_trt_build
def test_tensorrt_plan_from_another_version_or_gpu_says_rebuild(trt_dir, tmp_path, monkeypatch):
    from nuwaxl.engine.tensorrt_backend import TrtEngine

    d = tmp_path / "copy"
    shutil.copytree(trt_dir, d)
    spec = expected_specs(d)["unet_step"]
    record = d / "tensorrt" / "unet_step.json"
    original = record.read_text()
    record.write_text(original.replace(f'"version": "{TRT["version"]}"', '"version": "0.0.1"'))
    with pytest.raises(UserError, match="was built with .* 0.0.1 but .* is installed; rebuild"):
        TrtEngine(d / "tensorrt" / "unet_step.plan", spec, torch.device("cuda"))
    record.write_text(original)
    monkeypatch.setattr(tensorrt_backend, "status", lambda: {"can_run": True})
    monkeypatch.setattr(tensorrt_backend, "_gpu", lambda: ("NVIDIA H100", (9, 0)))
    with pytest.raises(UserError, match=r"built for \['sm89'\] but this GPU \(NVIDIA H100\) is sm90; rebuild"):
        TrtEngine(d / "tensorrt" / "unet_step.plan", spec, torch.device("cuda"))


def test_tensorrt_engines_run_or_skip_with_the_reason(trt_dir, ort_dir):
    if not TRT["can_run"]:
        pytest.skip(TRT["why_not_run"])
    nets = load_engines(trt_dir)
    x = torch.randn(2, 16, 3, 32, 32, device="cuda", dtype=torch.float16)
    ref = load_engines(ort_dir, device="cuda" if torch.cuda.is_available() else "cpu").encode_frames(x.float())
    torch.testing.assert_close(nets.encode_frames(x).float(), ref.to(x.device).float(), atol=3e-2, rtol=3e-2)


def test_generate_with_onnxruntime_engines_matches_pytorch(ort_dir, tmp_path, capsys):
    assert_engines_match_pytorch(ort_dir, tmp_path, capsys)


def test_engine_dir_batches_larger_than_built_are_split(ort_dir):
    nets = load_engines(ort_dir, device="cpu")
    video = torch.rand(MAX_ROWS * 2 + 1, 16, 3, 32, 32) * 2 - 1
    split = nets.encode_frames(video)
    assert split.shape[0] == MAX_ROWS * 2 + 1
    torch.testing.assert_close(split[-1:], nets.encode_frames(video[-1:]))


def test_engine_directory_carries_the_sampling_defaults(ort_dir, tmp_path):
    from nuwaxl.runtime.pipeline import Pipeline

    # random weights: no guidance, the generic steps and sampler
    assert read_manifest(ort_dir)["sampling"] == {"guidance_scale": 1.0, "num_inference_steps": 25, "sampler": "ddim"}
    tuned = tmp_path / "tuned"
    shutil.copytree(ort_dir, tuned)
    m = read_manifest(tuned)
    (tuned / "engines.json").write_text(json.dumps({**m, "sampling": {"guidance_scale": 2.5, "sampler": "dpmpp-2m"}}))
    options = Pipeline.from_engines(tuned, device="cpu").prepare(["a cat"], num_frames=16).options
    assert (options.guidance_scale, options.sampler, options.num_inference_steps) == (2.5, "dpmpp-2m", 25)
    (tuned / "engines.json").write_text(json.dumps({**m, "sampling": {"guidance_scale": 2.5}}))  # an older build's
    assert Pipeline.from_engines(tuned, device="cpu").prepare(["a cat"], num_frames=16).options.guidance_scale == 2.5
    (tuned / "engines.json").write_text(json.dumps({**m, "sampling": {"guidance": 2.5}}))
    with pytest.raises(UserError, match=r"unknown sampling defaults \['guidance'\]"):
        load_engines(tuned, device="cpu")


def test_engine_directory_errors(ort_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="engine directory not found"):
        read_manifest(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(ort_dir, broken)
    (broken / "engines.json").unlink()
    with pytest.raises(UserError, match="has no engines.json: not an engine directory, or an interrupted build"):
        read_manifest(broken)
    (broken / "engines.json").write_text("{not json")
    with pytest.raises(UserError, match="is corrupt"):
        read_manifest(broken)
    (broken / "engines.json").write_text((ort_dir / "engines.json").read_text())
    (broken / "onnx" / "unet_step.onnx").unlink()
    with pytest.raises(UserError, match="engine file missing: .*unet_step.onnx; rebuild"):
        load_engines(broken, device="cpu")
    size = (ort_dir / "onnx" / "unet_step.onnx").stat().st_size
    (broken / "onnx" / "unet_step.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unet_step.onnx has 7 bytes but was built with"):
        load_engines(broken, device="cpu")
    (broken / "onnx" / "unet_step.onnx").write_bytes(b"\0" * size)  # same size, other bytes: ONNX Runtime says so
    with pytest.raises(UserError, match="ONNX Runtime cannot load"):
        load_engines(broken, device="cpu")
    edited = tmp_path / "edited"
    shutil.copytree(ort_dir, edited)
    m = json.loads((edited / "engines.json").read_text())
    m["model_config"]["resolution"] = 64  # the ONNX files were exported for 32 px
    (edited / "engines.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"engines.json: its model_config gives unet_prepare tensor 'cond' the shape "
                                        r"\('batch', 16, 4, 8, 8\), but the engine was built for "
                                        r"\('batch', 16, 4, 4, 4\): the manifest was edited or damaged; rebuild"):
        load_engines(edited, device="cpu")
    (edited / "engines.json").write_text(json.dumps({**m, "format_version": 2}))  # built before the UNet split
    with pytest.raises(UserError, match=r"is format 'nuwaxl-engines' v2, this trt-nuwaxl reads .* v3 \(the UNet is "
                                        r"two networks now .*\); rebuild with trt-nuwaxl build --force"):
        load_engines(edited, device="cpu")
    shutil.copy(ort_dir / "engines.json", edited / "engines.json")
    with (edited / "onnx" / "unet_step.onnx").open("ab") as f:
        f.write(b"\0")  # damaged after the build
    with pytest.raises(UserError, match=r"unet_step.onnx has \d+ bytes but was built with \d+: it changed after"):
        load_engines(edited, device="cpu")
    out = str(tmp_path / "v.mp4")
    assert main(["generate", "--engines", str(tmp_path / "nope"), "--out", out]) == 2
    hint = capsys.readouterr().err
    assert "build one with: trt-nuwaxl build --backend onnxruntime" in hint and "--preset" not in hint
    assert main(["generate", "--engines", str(ort_dir), "-L", "8", "--frames", "20", "--out", out]) == 2
    assert "were built for --frames-per-call 16, not 8" in capsys.readouterr().err
    assert main(["generate", "--engines", str(ort_dir), "--resolution", "64", "--frames", "20", "--out", out]) == 2
    assert "were built for --resolution 32, not 64" in capsys.readouterr().err


def test_build_errors(tmp_path, monkeypatch):
    from nuwaxl.engine import onnxruntime_backend

    with pytest.raises(UserError, match="unknown backend 'tvm'"):
        build(tmp_path / "x", "tvm", preset_name="tiny")
    with pytest.raises(UserError, match="fp16 AOTInductor packages need a CUDA device"):
        build(tmp_path / "x", "torch", "fp16", preset_name="tiny", device="cpu")
    with pytest.raises(UserError, match=r"parity='1,x': give a comma list"):
        build(tmp_path / "x", "onnxruntime", "fp32", preset_name="tiny", device="cpu", parity="1,x")
    monkeypatch.setattr(onnxruntime_backend, "ort", None)  # onnxruntime not installed: said before any export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported before the check"))
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(UserError, match="onnxruntime is not installed .*: the onnxruntime and tensorrt builds "
                                            "check their ONNX export"):
            build(tmp_path / "x", backend, "fp32", preset_name="tiny", device="cpu")
    assert not (tmp_path / "x").exists()  # and no partial folder is left


def test_build_without_parity_and_without_torchvision_noise(tmp_path, caplog):
    """--parity none (offered by the CLI) builds and records that parity was not measured; the ONNX exporter's
    "torchvision is not installed" lines (16 per build) are gone."""
    out = tmp_path / "p"
    with caplog.at_level("WARNING"):
        build(out, "onnxruntime", "fp32", 2, preset_name="tiny", device="cpu", parity="none", progress=False,
              log=quiet, only=("text_encoder",))
    parity = json.loads((out / "onnx" / "text_encoder.json").read_text())["parity"]
    assert parity["measured"] is False and parity["batches"] == {}
    assert not [r for r in caplog.records if "torchvision" in r.getMessage()]


def test_doctor_reports_each_backend_with_a_reason():
    from nuwaxl.doctor import report

    r = report()
    assert set(r["backends"]) >= {"torch-eager", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt-build",
                                  "tensorrt-run", "torch-aoti"}
    for item in r["backends"].values():
        assert item["usable"] or item["why"]
        assert item["cuda_graphs"]  # how each backend runs as CUDA graphs, or why it does not
    assert "enable_cuda_graph" in r["backends"]["onnxruntime-cuda"]["cuda_graphs"]
    assert "execute_async_v3" in r["backends"]["tensorrt-run"]["cuda_graphs"]
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in r["backends"]["tensorrt-run"]["why"]


def test_build_command_reports_stages_and_reuses_cached_work(ort_dir, capsys):
    """`trt-nuwaxl build` with the fixture's settings: every stage's cache key matches, nothing is redone."""
    args = ["build", "--preset", "tiny", "--backend", "onnxruntime", "--precision", "fp32", "--max-rows",
            str(MAX_ROWS), "--device", "cpu", "--out", str(ort_dir), "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: building from random (untrained) weights (preset tiny)")
    assert err.count("ONNX reused") == len(NETWORKS)
    assert "wrote" in err and "unet" in err and " s:" in err  # per-stage timing
    assert read_manifest(ort_dir)["backend"] == "onnxruntime"


def test_large_models_keep_weights_in_external_data(tmp_path, monkeypatch):
    """Models over the threshold (1 GiB; the paper UNet is 2.2 GB in fp16) store weights beside the graph."""
    from nuwaxl.engine.onnxruntime_backend import OrtEngine
    from nuwaxl.export import onnx_export
    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.networks import networks

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1024)
    cfg = preset("tiny")
    spec = io_specs(cfg, "fp32", 2)["text_encoder"]
    module = networks(NuwaModels.random(cfg))["text_encoder"]
    feeds = onnx_export.sample_inputs(spec, 2, torch.device("cpu"), torch.float32, 900, torch.Generator())
    path = tmp_path / "text_encoder.onnx"
    facts = onnx_export.export_onnx(module, spec, path, feeds)
    assert facts["external_data"] and (tmp_path / "text_encoder.onnx.data").stat().st_size > path.stat().st_size
    out = OrtEngine(path, spec, torch.device("cpu")).run(feeds)["embeddings"]
    with torch.inference_mode():
        torch.testing.assert_close(out, module(feeds["input_ids"]), atol=1e-4, rtol=1e-4)


def test_vae_peak_elements_formula_matches_the_modules():
    """`peak_elements_per_row` is what bounds ONNX Runtime's and TensorRT's T-KLVAE rows (32-bit indexing): it
    must be the largest tensor the networks really make, measured here with hooks on every submodule."""
    from nuwaxl.iospec import peak_elements_per_row
    from nuwaxl.models.checkpoint import NuwaModels
    from nuwaxl.models.networks import networks

    config = preset("tiny")
    nets = networks(NuwaModels.random(config, seed=0))
    L, rows = config.frames_per_call, 2
    for name, x in (("vae_encoder", torch.randn(rows, L, 3, config.resolution, config.resolution)),
                    ("vae_decoder", torch.randn(rows, L, config.vae.latent_channels, config.latent_size,
                                                config.latent_size))):
        seen = []

        def largest(m, i, o, seen=seen):
            seen.append(max(t.numel() for t in [*i, *(o if isinstance(o, tuple) else (o,))]
                            if isinstance(t, torch.Tensor)))

        hooks = [m.register_forward_hook(largest) for m in nets[name].modules()]
        with torch.no_grad():
            nets[name](x)
        for h in hooks:
            h.remove()
        assert max(seen) == rows * peak_elements_per_row(config, name, L), name
    peak = peak_elements_per_row(config, "vae_decoder", L)
    specs = io_specs(config, "fp32", 16, elements_max=3 * peak + 1)
    assert specs["vae_decoder"].batch_max == 3 and specs["unet_step"].batch_max == 16
    with pytest.raises(UserError, match="over this backend's limit"):
        io_specs(config, "fp32", 16, elements_max=peak - 1)
