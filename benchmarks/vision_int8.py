"""Fidelity of the int8 vision tower (`pruner-export --quantize-vision int8`) against fp32, on the bundled photographs.

    .venv/bin/python benchmarks/vision_int8.py [--model DIR] [--keep 64]

For each scikit-image photograph: the projector outputs of the fp32 tower and of the same tower with torchao's int8
dynamic activations / per-channel int8 weights (the quantization the ExecuTorch export applies), compared token by
token (cosine similarity: mean and minimum), and the tokens VLM-Pruner keeps before the LLM (layer 0: projector
outputs and decoder layer 0's keys) on each: the share of the fp32 selection the int8 one keeps too.

The default model is LLaVA-1.5-7B's vision tower and projector at real width and depth (CLIP ViT-L/14-336, random
weights; the decoder has 1 layer, which the layer-0 keys need), built once into --work-dir.

Speed (unless --no-speed): the vision tower + projector alone, fp32 and int8, each lowered to an XNNPACK .pte and run
in the ExecuTorch runtime on the astronaut's pixels, median of --repeats: the time to first token the int8 tower
saves (the rest of the prompt's path is the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchmarks.llava_shapes import llava_7b_widths  # noqa: E402
from pruner_core import PrunerConfig  # noqa: E402
from pruner_core.adapters import (  # noqa: E402
    build_tiny_llava,
    encode_image,
    image_grid,
    load_llava,
    prompt_image_start,
    select_before_llm,
)


def tower_ms(model: torch.nn.Module, quantized: torch.nn.Module, pixels: torch.Tensor, repeats: int) -> dict:
    """Median ms of the vision tower + projector (the adapter's exportable vision module) as XNNPACK .pte files,
    fp32 and int8 (dynamically quantized linears), on ``pixels`` [1, 3, H, W]."""
    from bench_select import lower_to_pte, median_ms

    from pruner_core.adapters import adapter_for

    adapter = adapter_for(model)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in (("fp32", model), ("int8", quantized)):
            variant.requires_grad_(False).set_attn_implementation({"vision_config": "eager"})  # XNNPACK: eager matmuls
            module = adapter.vision_encoder(variant, adapter.geometry(variant).image_size).eval()
            with torch.no_grad():
                run = lower_to_pte(module, (pixels,), Path(tmp) / f"vision_{name}.pte")
            times[name] = median_ms(run, repeats, warmup=1)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a llava-hf directory (default: built, see above)")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path("exported") / "vision_int8")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "out" / "vision_int8.json")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each .pte (speed)")
    parser.add_argument("--no-speed", action="store_true", help="fidelity only: no .pte lowering and timing")
    args = parser.parse_args(argv)

    from runtime.console import quiet_libraries
    from export.executorch_export import quantize_vision_int8
    from runtime.preprocess import ImagePreprocessing, preprocess
    from skimage import data

    quiet_libraries()
    model_dir = args.model
    if model_dir is None:
        model_dir = args.work_dir / "llava7b-vision"
        if not (model_dir / "config.json").is_file():
            build_tiny_llava(model_dir, spec=llava_7b_widths(1))
    model, processor = load_llava(model_dir)
    quantized = copy.deepcopy(model)
    quantize_vision_int8(quantized)
    spec = ImagePreprocessing.from_hf_processor(processor.image_processor)
    config = PrunerConfig(keep=args.keep, layer=0)
    start = prompt_image_start(processor.tokenizer, model.config.image_token_id)
    grid = image_grid(model.config)
    rows = []
    for name in ("astronaut", "chelsea", "coffee"):
        pixels = torch.from_numpy(preprocess(getattr(data, name)(), spec))
        with torch.no_grad():
            reference = encode_image(model, pixels)  # [1, N, D]
            approximate = encode_image(quantized, pixels)
            cosine = torch.nn.functional.cosine_similarity(reference[0], approximate[0], dim=-1)  # [N]
            kept = select_before_llm(model, reference, start, grid, config).indices[0].tolist()
            kept_int8 = select_before_llm(model, approximate, start, grid, config).indices[0].tolist()
        overlap = len(set(kept) & set(kept_int8)) / len(kept)
        rows.append({"image": name, "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                     "kept_overlap": overlap})
        print(f"{name:<10} cosine mean {float(cosine.mean()):.4f} min {float(cosine.min()):.4f}  "
              f"kept tokens shared with fp32: {overlap:.0%} of {len(kept)}")
    summary = {"model": str(model_dir), "keep": args.keep, "images": rows,
               "cosine_mean": statistics.mean(r["cosine_mean"] for r in rows),
               "kept_overlap_mean": statistics.mean(r["kept_overlap"] for r in rows)}
    if not args.no_speed:
        pixels = torch.from_numpy(preprocess(data.astronaut(), spec))
        summary["tower_ms"] = tower_ms(model, quantized, pixels, args.repeats)
        fp32_ms, int8_ms = summary["tower_ms"]["fp32"], summary["tower_ms"]["int8"]
        print(f"vision tower + projector .pte (XNNPACK), median of {args.repeats}: fp32 {fp32_ms:.0f} ms, "
              f"int8 {int8_ms:.0f} ms ({fp32_ms / int8_ms:.2f}x; {fp32_ms - int8_ms:.0f} ms off time to first token)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"mean cosine {summary['cosine_mean']:.4f}, mean kept overlap {summary['kept_overlap_mean']:.0%}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
