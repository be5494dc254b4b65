"""README.md, the model card pruner-export writes into every export folder.

What the folder holds and how it was made (source model and revision, method, keep, R of N, placement, dtype,
quantization, each file's size, the validation figures) and how to run it, with only the sections that apply to the
folder's target and placement: pruner-run (every export), ExecuTorch's runner and the Android app (a layer-0
`.pte`: the stock runner's contract), transformers.js (a layer-0 ONNX folder with consecutive positions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
TRANSFORMERS_JS_DTYPES = {("fp32", "none"): "fp32", ("fp16", "none"): "fp16", ("fp32", "int8"): "q8",
                          ("fp32", "int4"): "q4", ("fp16", "int4"): "q4"}  # export dtype/quantize -> its `dtype`


def source_revision(model_dir: str | Path, random_weights: bool) -> str:
    """Where the weights come from: "random weights, tiny" for a tiny build; the hub commit for a snapshot in the
    Hugging Face cache (``.../models--owner--name/snapshots/<commit>``); else "local directory"."""
    if random_weights:
        return "random weights, tiny"
    path = Path(model_dir).resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
        return f"{repo} at commit {path.name}"
    return f"local directory {path} (no hub revision)"


def human_size(size: int) -> str:
    """Bytes -> "12.3 MiB" (binary units)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file in ``folder`` except the card itself, sorted."""
    return [(str(path.relative_to(folder)), path.stat().st_size) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder) != Path(CARD_FILE)]


def _bound(value: float | None, words: str) -> str:
    return "not bounded" if value is None else f"{words} {value:g}"


def _validation_lines(validation: dict[str, Any] | None) -> list[str]:
    validation = validation or {"skipped": "--no-validate"}  # None: a config from before the reason was recorded
    if validation.get("skipped") == "--no-validate":
        return ["Not validated: exported with `--no-validate`."]
    if "skipped" in validation:
        return [f"Not validated ({validation['skipped']}): pruner-export estimated that running this folder and the "
                "eager model needs more memory than the exporting machine had. Run it with `pruner-run` where it fits."]
    tolerance = validation["tolerance"]
    tokens = "every greedy token identical" if tolerance["tokens_must_agree"] else "reported only (quantized)"
    return [
        f"pruner-export ran this folder once against {validation['reference']} on the bundled "
        f"`{validation['image']}` photograph, prompt \"{validation['prompt']}\", {len(validation['export_tokens'])} "
        "greedy tokens:",
        "",
        f"- max |logit difference|: {validation['max_logit_diff']:.3g} over {validation['steps_compared']} step(s) "
        f"({_bound(tolerance.get('max_logit_diff'), 'tolerance')})",
        f"- smallest correlation of the next-token logits: {validation.get('min_logit_correlation', float('nan')):.4f}"
        f" ({_bound(tolerance.get('min_logit_correlation'), 'required at least')})",
        f"- greedy tokens: {'identical' if validation['tokens_agree'] else 'differ'} (export "
        f"{validation['export_tokens']}, reference {validation['eager_tokens']}); required: {tokens}",
        f"- result: {'passed' if validation['passed'] else 'failed'}",
    ]


def runner_prompt(tokenizer: dict[str, Any], question: str) -> tuple[str, str, str]:
    """The family's prompt format (export_config.json ``tokenizer.prompt_format``) around ``question``, split at
    its image token -> (text before the image, the image token, text after)."""
    text = tokenizer["prompt_format"].format(prompt=question)
    return text.partition(tokenizer["image_token"])


def _executorch_lines(config: dict[str, Any], folder: str) -> list[str]:
    program = config["executorch"]["program"]
    if config["executorch"].get("position_scheme", "1d") != "1d":
        return ["## ExecuTorch's runner", "",
                "Its `text_decoder` takes M-RoPE `position_ids` [3, 1, T] and its `vision_encoder` flat patches, "
                "which ExecuTorch's stock `MultimodalRunner` (and the Android app on it) cannot feed; run it with "
                "pruner-run or `runtime.load` (ExecuTorch's Python runtime)."]
    if config["placement"] != "before_llm":
        return ["## ExecuTorch's runner", "",
                "Pruned inside the LLM: its `vision_encoder` and `text_decoder` share state in mutable buffers, "
                "which ExecuTorch 1.5.1's `MultimodalRunner` does not share between methods; run it with pruner-run "
                "(ExecuTorch's Python runtime)."]
    tokenizer = config["tokenizer"].get("runner_file") or "tokenizer.json"
    bos = 1 if "get_bos_id" in config["executorch"].get("constant_methods", {}) else 0
    before, _, after = runner_prompt(config["tokenizer"], "What is in the picture?")
    return [
        "## ExecuTorch's runner", "",
        "The stock `MultimodalRunner` (Python bindings of the executorch wheel; the C++ runner and Android's "
        "`LlmModule` call the same methods):", "",
        "```python",
        "from executorch.extension.llm.runner import (GenerationConfig, MultimodalRunner, make_image_input,",
        "                                             make_text_input)",
        "from runtime.preprocess import ImagePreprocessing, load_image, preprocess",
        "import json, torch",
        f"config = json.load(open(\"{folder}/export_config.json\"))",
        "pixels = preprocess(load_image(\"photo.jpg\"), ImagePreprocessing.from_dict(config[\"image_preprocessing\"]))",
        f"runner = MultimodalRunner(\"{folder}/{program}\", \"{folder}/{tokenizer}\")",
        f"runner.generate([make_text_input({before!r}), make_image_input(torch.from_numpy(pixels)),",
        f"                 make_text_input({after!r})],",
        f"                GenerationConfig(echo=False, max_new_tokens=64, temperature=0.0, num_bos={bos}), print)",
        "```",
        "",
        "The binding hands `print` each token's text as a Python str; a model that emits a lone byte of a multi-byte "
        "UTF-8 character (random-weights builds often do) makes it raise UnicodeDecodeError there. pruner-run "
        "decodes such bytes safely.",
    ]


def _android_lines(config: dict[str, Any], out: Path) -> list[str]:
    from .android import adb_push_commands, android_files, default_android_folder

    android = default_android_folder(out)
    try:
        files = android_files(config)
    except ValueError:  # no tokenizer the runner reads: the app cannot run it (pruner-export --android says why)
        return []
    return [
        "## Android app (android_demo)", "",
        f"`pruner-export ... --android` copies the files the app reads ({', '.join(files)}) into "
        f"`{android}`; push them with:", "",
        "```sh",
        *adb_push_commands(android, files=files),
        "```",
    ]


def _transformers_js_lines(config: dict[str, Any], out: Path) -> list[str]:
    dtype = TRANSFORMERS_JS_DTYPES.get((config["dtype"], config["quantization"]), config["dtype"])
    return [
        "## transformers.js (Node)", "",
        f"The graphs follow transformers.js' layout. The folder's processor files make `AutoProcessor` expand "
        f"the image placeholder into the {config['image_placeholders']} kept tokens the vision encoder returns "
        f"(of {config['num_image_tokens']}).", "",
        "```js",
        "import { AutoProcessor, LlavaForConditionalGeneration, env } from \"@huggingface/transformers\";",
        f"env.localModelPath = \"{out.parent}/\"; env.allowRemoteModels = false;",
        f"const model = await LlavaForConditionalGeneration.from_pretrained(\"{out.name}\", "
        f"{{ local_files_only: true, dtype: \"{dtype}\" }});",
        f"const processor = await AutoProcessor.from_pretrained(\"{out.name}\", {{ local_files_only: true }});",
        "```",
    ]


def render_card(config: dict[str, Any], out: Path, files: list[tuple[str, int]], source: str) -> str:
    """The card's Markdown for an export ``config`` (export_config.json's payload, with ``validation`` or None) that
    lives at ``out``; ``files``: (relative path, bytes) as ``folder_files`` lists them."""
    pruner = config["pruner"]
    layer = pruner["layer"]
    placement = "before the LLM" if config["placement"] == "before_llm" else \
        f"inside the LLM, between decoder layers {layer - 1} and {layer}"
    quantization = config["quantization"] + (
        f", vision {config['vision_quantization']}" if config.get("vision_quantization", "none") != "none" else "")
    rows = [
        ("source model", f"`{config['model']}` ({config['model_id']})" if config["model"] != config["model_id"]
         else f"`{config['model']}`"),
        ("revision", source),
        ("method", pruner["method"] + (" (the authors' unmerged grid placement, --authors-grid)"
                                       if pruner.get("authors_grid") else "")),
        ("keep", str(pruner["keep"])),
        ("image tokens", f"R = {config['kept_image_tokens']} of N = {config['num_image_tokens']}"),
        ("placement", f"--prune-layer {layer}: {placement} (`{config['placement']}`)"),
        ("target", f"{config['target']} ({config['backend']})"),
        ("dtype", config["dtype"]),
        ("quantization", quantization),
        ("max_seq_len", str(config["max_seq_len"])),
    ]
    lines = [f"# {config['model']}, {pruner['method']} keep {pruner['keep']}: {config['target']}", ""]
    if config.get("random_weights"):
        lines += ["Random weights (a tiny test build): its answers are gibberish by design.", ""]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    lines += ["## Files", "", "| file | size |", "|---|---:|",
              *(f"| `{name}` | {human_size(size)} ({size} bytes) |" for name, size in files), ""]
    lines += ["## Validation", "", *_validation_lines(config.get("validation")), ""]
    lines += ["## pruner-run", "", "```sh", f"pruner-run {out} --image astronaut --prompt \"What is in the picture?\"",
              "```", ""]
    layer0 = config["placement"] == "before_llm"
    if config["target"] == "executorch":
        lines += [*_executorch_lines(config, str(out)), ""]
        stock = config["executorch"].get("position_scheme", "1d") == "1d"  # what the app's LlmModule feeds
        android = _android_lines(config, out) if layer0 and stock else []
        lines += [*android, ""] if android else []
    if config["target"] == "onnx" and layer0 and config.get("positions") == "consecutive":
        lines += [*_transformers_js_lines(config, out), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path, config: dict[str, Any], out: Path, source: str) -> Path:
    """Write ``folder``/README.md for the export that will live at ``out`` (``folder`` may be its staging folder)."""
    path = folder / CARD_FILE
    path.write_text(render_card(config, out, folder_files(folder), source))
    return path
