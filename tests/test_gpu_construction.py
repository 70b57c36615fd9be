"""A dry run of the GPU code on the CPU: every object a GPU run builds, built as far as it can be
without a GPU, so that a crash of the kind "the GPU path fails at start-up" fails here first.

No test here is marked ``gpu``: they run everywhere. Where the only way to reach a GPU branch is to
pretend CUDA is there, a test patches ``torch.cuda`` (or a tensor method that needs a driver) and
says so; no CUDA kernel runs. What these tests cannot show (kernels, nvJPEG, speed) is what
``tests/test_gpu.py`` checks on a real GPU (``bench/gpu_check.sh`` runs it).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from data_pipelines import dali, layout
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import OptimSpec
from tests.test_fast_path import _OpRecorder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pretend_cuda(monkeypatch):
    """``torch.cuda`` says one GPU is there (no kernel runs; nothing here touches the driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _train_files(root: Path):
    train, _ = layout.scan_dataset(root)
    return train.files, train.labels


# -- DALI: the GPU loader and its pipelines ----------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_loader_builds_and_puts_its_batches_on_the_cuda_device(pretend_cuda, train):
    """Bug: ``torch.device("gpu", 0)`` raised in the constructor, so every dali_gpu loader failed."""
    loader = dali.DALILoader(["a.jpg"], [0], train=train, batch_size=1,
                             options=dali.PipelineOptions(device="gpu", device_id=0))
    assert loader.options.output_device == torch.device("cuda", 0)
    assert loader.options.device_id == 0


def _specs(pipe) -> dict[str, dict[str, str]]:
    """Each operator of a defined DALI graph: its arguments as DALI's OpSpec prints them.
    ``Pipeline._build_graph`` is private: it defines the graph (checking every argument's name
    against the operator's schema) without creating the backend, which needs CUDA for a GPU
    pipeline. If DALI renames it, this fails loudly rather than passing."""
    pipe._build_graph()  # noqa: SLF001
    specs = {}
    for op in pipe._ops:  # noqa: SLF001
        text = str(op.spec)
        name = re.search(r"OpSpec for (\S+?):", text).group(1)
        args = dict(re.findall(r"^\s{4}(\w+): (.*)$", text.split("Arguments:", 1)[1], re.M))
        specs[name] = args
    return specs


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype,channels_last", [("float32", False), ("bfloat16", True), ("float16", True)])
def test_dali_gpu_pipelines_define_their_graph_with_valid_arguments(pretend_cuda, tiny_root, train, dtype, channels_last):
    """The mixed decoder, resize and normalisation with the arguments a GPU run gives them: every
    name exists in DALI 2.4's schemas, chroma is upsampled as the CPU decoder does, and the output
    has the layout and dtype the loader expects. Building the backend is the first step that
    needs CUDA, and it fails for that reason only."""
    files, labels = _train_files(tiny_root)
    options = dali.PipelineOptions(image_size=32, val_resize=36, device="gpu", device_id=0, dtype=dtype,
                                   channels_last=channels_last, num_threads=2)
    loader = dali.DALILoader(files, labels, train=train, batch_size=4, options=options)
    pipe = loader.pipeline(range(8))
    specs = _specs(pipe)
    decoder = specs["decoders__ImageRandomCrop" if train else "decoders__Image"]
    assert decoder["device"] == "mixed"
    assert decoder["jpeg_fancy_upsampling"] == "True", "nvJPEG would upsample chroma unlike libjpeg-turbo"
    assert int(decoder["host_memory_padding"]) > 0 and int(decoder["device_memory_padding"]) > 0
    assert specs["Resize"]["device"] == "gpu"
    normalise = specs["CropMirrorNormalize"]
    assert normalise["device"] == "gpu"
    assert normalise["output_layout"] == ("HWC" if channels_last else "CHW")
    from nvidia.dali import types

    assert int(normalise["dtype"]) == int(types.FLOAT16 if dtype == "float16" else types.FLOAT)
    with pytest.raises(RuntimeError, match="CUDA"):
        pipe.build()


@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_pipelines_read_a_pack_with_the_webdataset_reader(pretend_cuda, tiny_pack, train):
    """dali_gpu from a pack: DALI's webdataset reader (our order in its indices, no shuffle of its
    own) feeds the mixed decoder, and the ``.cls`` labels, padded to a fixed width, go to the GPU
    with the images; the graph defines with every argument valid, and building fails only for
    want of CUDA."""
    from data_pipelines import shards
    from data_pipelines.sources import PackSource

    manifest = shards.read_manifest(tiny_pack)
    split = PackSource(manifest.train if train else manifest.val)
    options = dali.PipelineOptions(image_size=32, val_resize=36, device="gpu", device_id=0, num_threads=2)
    loader = dali.DALILoader(split, train=train, batch_size=4, options=options)
    pipe = loader.pipeline(range(len(split)))
    specs = _specs(pipe)
    reader = specs["readers__Webdataset"]
    assert reader["random_shuffle"] == "False" and reader["device"] == "cpu"
    assert specs["decoders__ImageRandomCrop" if train else "decoders__Image"]["device"] == "mixed"
    assert specs["Pad"]["device"] == "cpu" and specs["CropMirrorNormalize"]["device"] == "gpu"
    with pytest.raises(RuntimeError, match="CUDA"):
        pipe.build()


@pytest.mark.parametrize("policy", ["trivial_wide", "rand_augment"])
def test_dali_gpu_auto_augment_is_defined_on_the_gpu(pretend_cuda, tiny_root, policy):
    """aug.auto_augment on dali_gpu: DALI's auto_aug operators (selected per sample by conditionals)
    run on the GPU, between the resize and the normalisation; the graph defines with every argument
    valid. Their kernels run on a real GPU only (tests/test_gpu.py)."""
    files, labels = _train_files(tiny_root)
    options = dali.PipelineOptions(image_size=32, device="gpu", device_id=0, num_threads=2, auto_augment=policy)
    loader = dali.DALILoader(files, labels, train=True, batch_size=4, options=options)
    pipe = loader.pipeline(range(8))
    specs = _specs(pipe)
    for op in ("WarpAffine", "Rotate", "Brightness", "experimental__Equalize", "_conditional__Split",
               "_conditional__Merge", "Resize", "CropMirrorNormalize"):
        assert specs[op]["device"] == "gpu", op
    assert float(specs["WarpAffine"]["fill_value"]) == 0  # torchvision's fill (DALI's default is 128)
    with pytest.raises(RuntimeError, match="CUDA"):
        pipe.build()


def _graph(pipe) -> dict[str, dict]:
    """Each operator of a defined DALI graph by its output node's name (e.g. ``__Uniform_2_cpu``;
    :func:`_specs` keys by operator, so two of one kind there are one): its operator ``op``,
    ``args`` (as in :func:`_specs`) and ``inputs``, data and argument inputs alike, as DALI's OpSpec
    prints them."""
    pipe._build_graph()  # noqa: SLF001
    nodes = {}
    for op in pipe._ops:  # noqa: SLF001
        text = str(op.spec)
        head, args = text.split("Arguments:", 1)
        block = head.split("Inputs:", 1)[1] if "Inputs:" in head else "Outputs:"
        inputs, outputs = block.split("Outputs:", 1)
        node = dict(op=re.search(r"OpSpec for (\S+?):", text).group(1), inputs=inputs.split(),
                    args=dict(re.findall(r"^\s{4}(\w+): (.*)$", args, re.M)))
        nodes.update({out: node for out in outputs.split()})
    return nodes


@pytest.mark.parametrize("policy", ["none", "trivial_wide"])
def test_dali_gpu_pad_crop_is_defined_on_the_gpu(pretend_cuda, tiny_root, policy):
    """aug.crop=pad_crop on dali_gpu (He et al.'s CIFAR crop): the whole image decoded by the mixed
    decoder (no random-resized ROI), resized to 32x32, then a 32x32 slice starting at a random
    whole-pixel (x, y) in [-4, 4] (drawn on the CPU, an argument input) that pads with black, the
    automatic augmentation when asked, and the flip in the normalisation, all on the GPU; every
    argument is valid in DALI 2.4's schemas, and building fails only for want of CUDA. Its
    pixels are checked on the CPU (tests/test_augment.py), where the same graph runs."""
    files, labels = _train_files(tiny_root)
    options = dali.PipelineOptions(image_size=32, device="gpu", device_id=0, num_threads=2, crop="pad_crop",
                                   crop_padding=4, auto_augment=policy)
    loader = dali.DALILoader(files, labels, train=True, batch_size=4, options=options)
    pipe = loader.pipeline(range(8))
    specs, graph = _specs(pipe), _graph(pipe)
    assert "decoders__ImageRandomCrop" not in specs
    decoder = specs["decoders__Image"]
    assert decoder["device"] == "mixed" and decoder["jpeg_fancy_upsampling"] == "True"
    resize = specs["Resize"]
    assert resize["device"] == "gpu" and float(resize["resize_x"]) == float(resize["resize_y"]) == 32
    cut = specs["Slice"]
    assert cut["device"] == "gpu" and cut["out_of_bounds_policy"] == "pad" and cut["axis_names"] == "WH"
    assert cut["shape"] == "[32, 32, ]" and cut["fill_values"] == "[0.000000, ]"
    (slice_node,) = [node for node in graph.values() if node["op"] == "Slice"]
    (start,) = [graph[name] for name in slice_node["inputs"] if graph[name]["op"] == "random__Uniform"]
    from nvidia.dali import types

    args = start["args"]
    assert args["device"] == "cpu" and args["shape"] == "[2, ]" and int(args["dtype"]) == int(types.INT32)
    assert [float(v) for v in re.findall(r"-?\d+\.\d+", args["values"])] == list(range(-4, 5))
    (normalise,) = [node for node in graph.values() if node["op"] == "CropMirrorNormalize"]
    assert normalise["args"]["device"] == "gpu"
    assert [graph[name]["op"] for name in normalise["inputs"]][1:] == ["random__CoinFlip"]  # the mirror
    if policy != "none":
        assert specs["WarpAffine"]["device"] == "gpu"
    with pytest.raises(RuntimeError, match="CUDA"):
        pipe.build()


def test_dali_cpu_pipeline_keeps_its_graph_on_the_cpu(tiny_root):
    files, labels = _train_files(tiny_root)
    loader = dali.DALILoader(files, labels, train=True, batch_size=4,
                             options=dali.PipelineOptions(image_size=32, device="cpu"))
    specs = _specs(loader.pipeline(range(8)))
    assert {args["device"] for args in specs.values()} == {"cpu"}
    augmented = dali.DALILoader(files, labels, train=True, batch_size=4,
                                options=dali.PipelineOptions(image_size=32, device="cpu", auto_augment="trivial_wide"))
    specs = _specs(augmented.pipeline(range(8)))
    assert "WarpAffine" in specs and {args["device"] for args in specs.values()} == {"cpu"}
    padded = dali.DALILoader(files, labels, train=True, batch_size=4,
                             options=dali.PipelineOptions(image_size=32, device="cpu", crop="pad_crop"))
    specs = _specs(padded.pipeline(range(8)))
    assert "Slice" in specs and {args["device"] for args in specs.values()} == {"cpu"}


# -- the batch the model gets: one pass over the images, in its layout ----------------------------

def _copies(ops: list[str]) -> list[str]:
    return [op for op in ops if any(k in op for k in ("_to_copy", "copy_", "clone", "contiguous"))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_dali_gpu_batch_reaches_the_model_with_at_most_one_copy(dtype):
    """What the GPU pipeline hands over with channels_last (NHWC, float16 when asked, float32
    otherwise), turned into the model's input: channels_last NCHW in the model's dtype after at
    most one copy (the bfloat16 cast), and the model's own ``contiguous(channels_last)`` copies
    nothing. Before, a bf16 batch was cast and then copied again into channels_last."""
    dali_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    nhwc = torch.randn(4, 16, 16, 3).to(dali_dtype)
    labels = torch.arange(4, dtype=torch.int32).reshape(4, 1)
    with _OpRecorder() as rec:
        images, out_labels = dali.model_batch(nhwc, labels, dtype=dtype, channels_last=True, device=None)
    assert images.shape == (4, 3, 16, 16) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert out_labels.dtype == torch.int64 and out_labels.shape == (4,)
    image_copies = [op for op in _copies(rec.ops) if "_to_copy" in op or "copy_" in op]
    assert len(image_copies) <= (1 if dtype != dali_dtype else 0) + 1  # + the labels' int32 -> int64
    torch.testing.assert_close(images.float(), nhwc.permute(0, 3, 1, 2).to(dtype).float())
    module = Classifier(build_model("resnet20", 4, channels_last=True), num_classes=4, batch_size=4,
                        optim=OptimSpec(lr=0.1, momentum=0.9), channels_last=True).to(dtype)
    seen = []
    module.model.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    module(images)
    assert seen[0].data_ptr() == images.data_ptr(), "the model copied the batch into channels_last again"


def test_dali_cpu_batches_come_normalised_in_channels_last(tiny_root):
    files, labels = _train_files(tiny_root)
    kwargs = dict(image_size=32, device="cpu", num_threads=1)
    last = dali.DALILoader(files, labels, train=True, batch_size=8, seed=3,
                           options=dali.PipelineOptions(channels_last=True, **kwargs))
    plain = dali.DALILoader(files, labels, train=True, batch_size=8, seed=3,
                            options=dali.PipelineOptions(channels_last=False, **kwargs))
    (a, la), (b, lb) = next(iter(last)), next(iter(plain))
    last.release(), plain.release()
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(la, lb)


def test_cpu_batches_bound_for_a_gpu_are_pinned_first(monkeypatch):
    """dali_cpu on a GPU run: a non_blocking copy from pageable memory makes the host wait for
    the GPU, so the batch is pinned first. Pinning needs a CUDA driver, so ``Tensor.pin_memory``
    and ``Tensor.is_pinned`` are patched here; on a GPU, tests/test_gpu.py moves real batches."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.shape) or self)
    batch = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert dali.transfer._pinned(batch, torch.device("cuda", 0)) is batch  # noqa: SLF001
    assert pinned == [batch.shape]
    dali.transfer._pinned(batch, torch.device("cpu"))  # noqa: SLF001
    assert pinned == [batch.shape], "a batch that stays on the CPU needs no pinning"


# -- the training pipeline is freed before validation -------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_the_pipeline_is_freed_when_its_last_batch_is_handed_out(tiny_root, train):
    """With the mixed decoder a pipeline holds GBs of pinned host memory; the training one must not
    stay alive through validation. It is freed as its last batch is handed out, before the
    consumer asks for more, and that batch stays valid."""
    train_split, val_split = layout.scan_dataset(tiny_root)
    split = train_split if train else val_split
    kwargs = dict(train=train, batch_size=4, seed=5,
                  options=dali.PipelineOptions(image_size=32, val_resize=36, device="cpu", num_threads=1))
    loader = dali.DALILoader(split.files, split.labels, **kwargs)
    it = iter(loader)
    batches = []
    for _ in range(len(loader)):
        batches.append(next(it))
        assert (loader._pipe is None) == (len(batches) == len(loader))  # noqa: SLF001
    with pytest.raises(StopIteration):
        next(it)
    # The freed pipeline's last batch against the same batch from a fresh run of the same epoch,
    # after other pipelines have come and gone (they would reuse freed memory).
    for _ in range(2):
        list(dali.DALILoader(split.files, split.labels, **kwargs))
    again = list(dali.DALILoader(split.files, split.labels, **kwargs))
    for (a, la), (b, lb) in zip(batches, again):
        assert torch.equal(a, b) and torch.equal(la, lb)


# -- the benchmarks' device handling -----------------------------------------------------------------

def _bench_module():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_throughput


def test_bench_cuda_device_carries_an_index_set_device_accepts(pretend_cuda, monkeypatch):
    """Bug: ``torch.cuda.set_device(torch.device("cuda"))`` raised ("Expected a torch.device with a
    specified index") in both GPU benchmarks. ``torch._C._cuda_setDevice`` is patched: it is where
    set_device reaches the driver, after checking its argument."""
    bench = _bench_module()
    set_to = []
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_to.append)
    for name in ("cuda", "auto", "cuda:0"):
        device = bench.parse_device(name)
        assert device == torch.device("cuda", 0)
        torch.cuda.set_device(device)
    assert set_to == [0, 0, 0]
    # The Lightning rows train on GPU 0: another index would time two GPUs in one table.
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=1"):
        bench.parse_device("cuda:1")


def test_bench_device_without_cuda(monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.parse_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench.parse_device("cuda")


# -- the Trainer and module a GPU fit builds ----------------------------------------------------------

def _as_if_on_cuda(monkeypatch):
    """The module chooses its SGD implementation as it would with its parameters on a GPU (torch's
    fused SGD also runs on the CPU, so the choice can be exercised here)."""
    from trainer import module as module_mod

    real = module_mod.sgd_implementation
    on_cuda = [SimpleNamespace(device=torch.device("cuda", 0))]
    monkeypatch.setattr(module_mod, "sgd_implementation", lambda params, **kw: real(on_cuda, **kw))


def _tiny_fit(tmp_path, precision_kwargs: dict, clip: float | None) -> pl.Trainer:
    from data_pipelines.synthetic import SyntheticLoader

    module = Classifier(build_model("resnet20", 4, channels_last=True), num_classes=4, batch_size=4,
                        optim=OptimSpec(lr=0.1, momentum=0.9), channels_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip,
                         default_root_dir=tmp_path, **precision_kwargs)
    trainer.fit(module, SyntheticLoader(num_batches=2, batch_size=4, image_size=32, num_classes=4, seed=0))
    assert trainer.global_step == 2
    return trainer


def _precision(name: str) -> dict:
    if name == "16-mixed":
        # Lightning turns 16-mixed into bf16-mixed on the CPU; its plugin, given directly, keeps
        # fp16 autocast and a GradScaler, as on a GPU.
        from pytorch_lightning.plugins.precision import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": name}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_under_mixed_precision_trains(tmp_path, monkeypatch, precision):
    """Bug: with fused SGD (chosen on a GPU), Lightning's MixedPrecision refused to clip gradients
    and the fit failed at its first step. Clipping now takes the foreach SGD."""
    _as_if_on_cuda(monkeypatch)
    trainer = _tiny_fit(tmp_path, _precision(precision), clip=1.0)
    assert trainer.optimizers[0].defaults["foreach"] is True
    assert not trainer.optimizers[0].defaults["fused"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_without_clipping_a_gpu_fit_keeps_fused_sgd(tmp_path, monkeypatch, precision):
    _as_if_on_cuda(monkeypatch)
    trainer = _tiny_fit(tmp_path, _precision(precision), clip=None)
    assert trainer.optimizers[0].defaults["fused"] is True


def test_clipping_in_full_precision_keeps_fused_sgd(tmp_path, monkeypatch):
    """Only the mixed-precision plugin refuses to clip for fused SGD; 32-true keeps the fast path."""
    _as_if_on_cuda(monkeypatch)
    trainer = _tiny_fit(tmp_path, _precision("32-true"), clip=1.0)
    assert trainer.optimizers[0].defaults["fused"] is True


def test_a_16_mixed_resume_keeps_the_sgd_implementation_it_chose(tmp_path, monkeypatch):
    """A checkpoint written with foreach SGD (clipping on, or a CPU run) resumed by a GPU run that
    chooses fused SGD: loading the optimizer state used to bring back the saved ``foreach`` flag,
    so the fused-announcing optimizer took the foreach path under the GradScaler and failed its
    first step ("Expected grad_scale and found_inf to be None")."""
    from data_pipelines.synthetic import SyntheticLoader
    from pytorch_lightning.plugins.precision import MixedPrecision

    def fit(clip, ckpt_path=None, epochs=1):
        module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, gradient_clip_val=clip, default_root_dir=tmp_path,
                             plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
        trainer.fit(module, SyntheticLoader(num_batches=2, batch_size=4, image_size=32, num_classes=4, seed=0),
                    ckpt_path=ckpt_path)
        return trainer

    _as_if_on_cuda(monkeypatch)
    first = fit(clip=1.0)
    assert first.optimizers[0].defaults["foreach"] is True
    ckpt = tmp_path / "clipped.ckpt"
    first.save_checkpoint(ckpt)
    resumed = fit(clip=None, ckpt_path=str(ckpt), epochs=2)
    assert resumed.global_step == 4
    assert all(g["fused"] is True and not g["foreach"] for g in resumed.optimizers[0].param_groups)


def test_a_gpu_fit_builds_its_trainer_module_and_data(pretend_cuda, tiny_root, tmp_path, monkeypatch):
    """trainer.run's builders for a bf16 dali_gpu fit with clipping, channels_last and 16 threads:
    the Trainer gets the GPU accelerator and bf16 plugin, the DataModule chooses dali_gpu in
    bfloat16 and channels_last, cuDNN autotuning is switched on by the build (not by an earlier
    test), and the module's model can be run on the meta device with those options."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from trainer.config import load_config
    from trainer.run import build_datamodule, build_module, wants_gpu

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = load_config([f"data.root={tiny_root}", "data.backend=auto", "data.batch_size=4", "data.image_size=32",
                       "data.val_resize=36", "model.arch=resnet20", "model.channels_last=true",
                       "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed",
                       "trainer.gradient_clip_val=1.0", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"])
    assert wants_gpu(cfg)
    dm = build_datamodule(cfg)
    if dali.dali_available():
        assert dm.backend == "dali_gpu"
    assert dm.gpu_dtype == "bfloat16" and dm.channels_last
    module = build_module(cfg, dm.classes)
    # Lightning's GPU accelerator asks the driver for the devices when the Trainer is built, so the
    # Trainer is built with the same flags on the CPU accelerator, and the GPU-only step,
    # use_fast_gpu_math, is checked on its own.
    from trainer.run import use_fast_gpu_math

    use_fast_gpu_math(deterministic=False)
    assert torch.backends.cudnn.benchmark
    trainer = pl.Trainer(accelerator="cpu", precision=cfg.trainer.precision, gradient_clip_val=cfg.trainer.gradient_clip_val,
                         logger=False, enable_checkpointing=False)
    assert isinstance(trainer.precision_plugin, MixedPrecision)
    from trainer.module import clips_under_amp, sgd_implementation

    assert sgd_implementation([SimpleNamespace(device=torch.device("cuda", 0))],
                              clip_under_amp=clips_under_amp(trainer)) == {"foreach": True}
    model = module.to("meta")
    out = model(torch.empty(4, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, len(dm.classes))


def test_synthetic_gpu_batches_come_in_the_models_dtype_and_layout():
    """The synthetic backend times the model alone: its batch is made once in the dtype and memory
    format the model consumes, so no step pays a cast or a layout copy."""
    from data_pipelines.datamodule import ImageNetDataModule
    from data_pipelines.specs import DataSpec

    dm = ImageNetDataModule(DataSpec(root=None, backend="synthetic", batch_size=4, image_size=32, val_resize=32,
                                     num_workers=0, seed=0, synthetic_size=16, num_classes=4),
                            on_gpu=True, gpu_dtype="bfloat16", channels_last=True)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
