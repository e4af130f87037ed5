"""`dinoforge export {onnx,hf,timm}`: write a backbone in another runtime's format into an output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from dinoforge.cli_common import DeviceOpt, ModelOpt, OutOpt, RandomInitOpt, WeightsOpt
from dinoforge.models.weights import load_model
from dinoforge.utils import write_json

app = typer.Typer(help="Export a backbone to ONNX, a Hugging Face folder or a timm state dict.", no_args_is_help=True)


def _timm_name(arch: dict) -> str:
    size = {384: "small", 768: "base", 1024: "large", 1536: "giant"}.get(arch["embed_dim"], "custom")
    reg = f"_reg{arch['num_register_tokens']}" if arch["num_register_tokens"] else ""
    return f"vit_{size}_patch{arch['patch_size']}{reg}_dinov2"


@app.command("onnx")
def onnx_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    device: DeviceOpt = "cpu",
    img_size: Annotated[int, typer.Option(help="Example side used for tracing (H, W stay dynamic).")] = 224,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch on a random batch.")] = True,
) -> None:
    """Export to OUT/model.onnx: pixel_values [B,3,H,W] -> cls_token [B,D], patch_tokens [B,N,D].

    Batch, height and width are dynamic (multiples of the patch size). With --check, the max abs
    difference to PyTorch under onnxruntime goes into OUT/export.json.
    """
    from dinoforge.export.onnx import export_onnx

    backbone = load_model(model, weights, device, random_init)
    path = export_onnx(backbone, out / "model.onnx", img_size=img_size)
    report: dict = {"format": "onnx", "file": path.name, "arch": backbone.arch}
    if check:
        report["check"] = check_onnx(backbone, path, img_size)
        typer.echo(f"onnxruntime vs PyTorch max abs diff: {report['check']['max_abs_diff']:.2e}")
    write_json(out / "export.json", report)
    typer.echo(f"wrote {out}")


def check_onnx(backbone: torch.nn.Module, path: Path, img_size: int) -> dict:
    """Run a random batch at a non-square size through onnxruntime and PyTorch; return the max difference."""
    import onnxruntime as ort

    p = backbone.patch_size
    h, w = img_size // p * p, (img_size // p + 2) * p
    x = torch.randn(2, backbone.patch_embed.proj.in_channels, h, w)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cls, patches = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = backbone.cpu().forward_features(x)
    diff = max(
        float(abs(torch.from_numpy(cls) - ref["x_norm_clstoken"]).max()),
        float(abs(torch.from_numpy(patches) - ref["x_norm_patchtokens"]).max()),
    )
    return {"input_shape": list(x.shape), "max_abs_diff": diff}


@app.command("hf")
def hf_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
) -> None:
    """Export to a Hugging Face folder (config.json + model.safetensors) for transformers' from_pretrained.

    Register models become Dinov2WithRegistersModel, others Dinov2Model. Note: HF's Dinov2Model
    resizes position embeddings without the official 0.1 offset, so away from the native resolution
    its features differ slightly from the official/dinoforge ones.
    """
    from dinoforge.export.hf import export_hf

    backbone = load_model(model, weights, "cpu", random_init)
    export_hf(backbone, out)
    typer.echo(f"wrote {out}")


@app.command("timm")
def timm_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    safetensors: Annotated[bool, typer.Option(help="Write model.safetensors instead of model.pth.")] = False,
) -> None:
    """Export to a timm state dict (OUT/model.pth) for timm's vit_*_patch14[_reg4]_dinov2 models.

    OUT/export.json names the timm model and the keyword arguments (img_size, depth, ...) to create it with.
    """
    from dinoforge.export.timm import export_timm

    backbone = load_model(model, weights, "cpu", random_init)
    path = export_timm(backbone, out / ("model.safetensors" if safetensors else "model.pth"))
    a = backbone.arch
    write_json(
        out / "export.json",
        {
            "format": "timm",
            "file": path.name,
            "timm_model": _timm_name(a),
            "create_kwargs": {"img_size": a["img_size"], "depth": a["depth"], "num_heads": a["num_heads"],
                              "embed_dim": a["embed_dim"], "init_values": a["init_values"] or None},
        },
    )  # fmt: skip
    typer.echo(f"wrote {out}")
