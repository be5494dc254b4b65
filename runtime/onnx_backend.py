"""Run an ONNX export of a pruned LLaVA (``export/onnx_export.py``) with onnxruntime: a loader and greedy generation.

Both placements, from ``export_config.json``:

* layer 0 (``before_llm``): the prompt carries R image placeholders; ``vision_encoder`` returns the R kept tokens,
  they are written into the placeholders, and ``decoder_model_merged`` prefills (empty past) and decodes, with
  consecutive positions, as any transformers.js-style runtime does.
* layer K >= 1 (``in_llm``): the prompt carries N placeholders; ``vision_encoder`` returns all N tokens;
  ``decoder_model_merged`` called with ``image_start`` (and empty caches) prunes between layers K-1 and K and returns
  per-layer caches of two lengths, called with ``image_start = -1`` it decodes from position T (the full prompt
  length). Folders exported before that graph was merged run their separate ``prefill_pruned`` graph instead.

Running needs numpy and onnxruntime only (no transformers); pass ``config`` to skip reading export_config.json
through ``export.common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .prompt import eos_ids

ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class KVCache:
    """Per-layer keys and values [1, Hkv, P_i, d], in the order the graphs take them (P_i may differ by layer)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    def length(self, layer: int) -> int:
        return int(self.keys[layer].shape[2])

    def feed(self) -> dict[str, np.ndarray]:
        feed = {}
        for i, (key, value) in enumerate(zip(self.keys, self.values, strict=True)):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = key, value
        return feed

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray], num_layers: int) -> "KVCache":
        return cls(
            keys=[outputs[f"present.{i}.key"] for i in range(num_layers)],
            values=[outputs[f"present.{i}.value"] for i in range(num_layers)],
        )


@dataclass
class Prefill:
    """The prompt's prefill: next-token logits [V], the cache, where decoding continues, which tokens were kept."""

    logits: np.ndarray
    cache: KVCache
    next_position: int
    kept_image_indices: np.ndarray | None  # [R] within the N image tokens


# onnxruntime's messages when a graph file or its external data cannot be read as written
_DAMAGED = ("protobuf", "Protobuf", "parse", "file_length", "external data", "External data", "external_data",
            "offset", "truncat", "No such file", "does not exist")


def open_session(path: Path, options: Any, kwargs: dict[str, Any]):
    """An onnxruntime session for one graph file. Its external data file (``<graph>.onnx_data``, when the graph has
    one) must exist (FileNotFoundError naming it); a damaged graph or data file raises ValueError naming them and
    saying to export again; any other failure (an operator or opset this onnxruntime lacks) ValueError naming
    the file, onnxruntime's reason and its version -- not onnxruntime's traceback."""
    import onnxruntime

    data = path.with_name(path.name + "_data")
    if _expects_external_data(path) and not data.is_file():
        raise FileNotFoundError(f"{data} is missing (the weights of {path.name}): the exported folder is "
                                "incomplete; export the model again")
    try:
        return onnxruntime.InferenceSession(str(path), options, **kwargs)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidProtobuf / RuntimeError
        reason = " ".join(str(error).split())[:400] or type(error).__name__
        if "provider" in reason.lower() and "available" in reason.lower():
            raise  # a device problem, not a file problem
        files = f"{path} (or its weights {data.name})" if data.is_file() else str(path)
        if type(error).__name__ in ("InvalidProtobuf", "NoSuchFile") or any(s in reason for s in _DAMAGED):
            raise ValueError(f"{files} is corrupt or incomplete: onnxruntime cannot load it ({reason}); export the "
                             "model again") from None
        raise ValueError(f"onnxruntime {onnxruntime.__version__} cannot load {path}: {reason}; use the onnxruntime "
                         "version the export was made for (export_config.json library_versions), or export "
                         "again") from None


def _expects_external_data(path: Path) -> bool:
    """Whether the graph file refers to external data (read without loading any weights)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged file: onnxruntime reports it
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


class OnnxModel:
    """An exported folder's graphs in onnxruntime sessions.

    folder: written by ``pruner-export --target onnx``; providers: onnxruntime execution providers
    (default CPU); config: the folder's export_config.json when the caller has read it already. Sessions are
    created for the graph files ``config["graphs"]`` names; open_graph(name, path) replaces onnxruntime with another
    engine whose sessions answer get_inputs / get_outputs / get_overridable_initializers / run as onnxruntime's do.
    """

    def __init__(
        self,
        folder: str | Path,
        providers: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
        *,
        provider_options: Sequence[dict[str, str]] | None = None,
        profile_dir: str | Path | None = None,
        open_graph: Callable[[str, Path], Any] | None = None,
    ):
        self.folder = Path(folder)
        if config is None:
            from export.common import read_export_config

            config = read_export_config(self.folder)
        self.config = config
        if self.config.get("target") != "onnx":
            raise ValueError(f"{self.folder} holds a target={self.config.get('target')!r} export; OnnxModel runs onnx exports")
        tokenizer = self.config["tokenizer"]
        self.image_token_id = int(tokenizer["image_token_id"])
        self.eos_ids = set(eos_ids(tokenizer))  # before any session: a config that cannot stop fails at once
        self.sessions = {}
        graphs = self.config["graphs"]
        if not graphs or not all(isinstance(f, str) for f in graphs.values()):
            raise ValueError(f"{self.folder}/export_config.json: graphs must map graph names to files, got {graphs!r}; "
                             "export the model again")
        for name, file in graphs.items():
            if open_graph is not None:  # another engine (runtime/openvino_backend.py): same calls, its sessions
                self.sessions[name] = open_graph(name, self._graph_path(file))
                continue
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # the layer-0 encoder's overridable image_start initializer is intended
            if profile_dir is not None:  # onnxruntime's operator profiler, one JSON trace per graph
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(profile_dir) / name)
            kwargs = {"providers": list(providers or ["CPUExecutionProvider"])}
            if provider_options is not None:
                kwargs["provider_options"] = [dict(o) for o in provider_options]
            self.sessions[name] = open_session(self._graph_path(file), options, kwargs)
        self.decoder = self.config["decoder"]
        self.position_scheme = self.decoder.get("position_scheme", "1d")  # exports before Qwen2-VL: 1-D
        self.grid = tuple(self.config["grid"])
        self._decoder_takes_image_start = "image_start" in {
            meta.name for meta in self.sessions["decoder_model_merged"].get_inputs()}

    def _graph_path(self, file: str) -> Path:
        path = self.folder / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the exported folder is incomplete; export the model again")
        return path

    # ---- what the export says ---------------------------------------------------------------------------------
    @property
    def placement(self) -> str:
        return self.config["placement"]

    @property
    def image_placeholders(self) -> int:
        """Image placeholder tokens the prompt carries: R at layer 0, N at layer >= 1."""
        return int(self.config["image_placeholders"])

    @property
    def max_seq_len(self) -> int:
        return int(self.config["max_seq_len"])

    def _float_type(self, graph: str, input_name: str) -> type:
        for meta in self.sessions[graph].get_inputs():
            if meta.name == input_name:
                return ONNX_FLOAT_TYPES[meta.type]
        raise KeyError(f"graph {graph} has no input {input_name!r}")

    def _run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[graph]
        names = [meta.name for meta in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))

    # ---- graphs -----------------------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [1, S] -> inputs_embeds [1, S, D]."""
        return self._run("embed_tokens", {"input_ids": np.asarray(input_ids, dtype=np.int64).reshape(1, -1)})[
            "inputs_embeds"
        ]

    def encode_image(self, pixel_values: np.ndarray, image_start: int) -> tuple[np.ndarray, np.ndarray | None]:
        """pixel_values [1, C, H, W] -> (image_features [1, placeholders, D], kept_image_indices [1, R] or None).

        image_start: where the image span starts in the prompt (the layer-0 encoder's selection reads the image
        tokens' RoPE positions; the full encoder ignores it)."""
        feed = {"pixel_values": np.asarray(pixel_values).astype(self._float_type("vision_encoder", "pixel_values"))}
        if "image_start" in {meta.name for meta in self.sessions["vision_encoder"].get_overridable_initializers()}:
            feed["image_start"] = np.array([image_start], dtype=np.int64)
        outputs = self._run("vision_encoder", feed)
        return outputs["image_features"], outputs.get("kept_image_indices")

    def prompt_ids(self, before: Sequence[int], after: Sequence[int]) -> np.ndarray:
        """[1, T]: before + image placeholders (as many as the export needs) + after."""
        ids = [*before, *[self.image_token_id] * self.image_placeholders, *after]
        return np.asarray(ids, dtype=np.int64)[None]

    def prefill(self, before: Sequence[int], pixel_values: np.ndarray, after: Sequence[int]) -> Prefill:
        """Run the prompt (text before the image, the image, text after it) -> logits, cache, next position."""
        ids = self.prompt_ids(before, after)  # [1, T]
        start = len(before)
        features, kept = self.encode_image(pixel_values, start)  # [1, placeholders, D]
        embeds = self.embed(ids).copy()  # [1, T, D]
        embeds[:, start : start + features.shape[1]] = features
        prefill = self.prefill_embeds(embeds, start, None if kept is None else kept[0])
        if prefill.kept_image_indices is None and kept is not None:  # layer 0: the encoder's selection
            prefill.kept_image_indices = kept[0]
        return prefill

    def prefill_embeds(self, embeds: np.ndarray, image_start: int, kept: np.ndarray | None = None) -> Prefill:
        """The whole prompt's embeddings [1, T, D] (image features from ``encode_image`` in place at image_start)
        -> logits, cache, next position; at layer K the decoder also reports the kept image tokens.

        kept [R]: the layer-0 encoder's kept_image_indices (M-RoPE exports place the kept tokens at their original
        positions with them; 1-D ones use consecutive positions and may leave it None)."""
        from .positions import prompt_positions

        length = embeds.shape[1]
        if self.placement == "before_llm":
            if kept is None and self.position_scheme != "1d":
                raise ValueError("this export keeps the kept tokens' original positions: pass the vision encoder's "
                                 "kept_image_indices")
            after = length - image_start - self.image_placeholders
            positions, next_position = prompt_positions(self.position_scheme, image_start, self.grid, after, kept)
            logits, cache = self._decode(embeds, positions, self._empty_cache(embeds.dtype))
            return Prefill(logits=logits[0, -1], cache=cache, next_position=next_position, kept_image_indices=None)
        positions, next_position = prompt_positions(self.position_scheme, image_start, self.grid,
                                                     length - image_start - self.image_placeholders)
        if "prefill_pruned" not in self.sessions:  # one decoder graph: image_start >= 0 prunes this call
            outputs = self._run("decoder_model_merged", self._decoder_feed(
                embeds, positions, self._empty_cache(embeds.dtype), image_start))
        else:  # exports made before the layer-K graphs were merged (weights stored twice)
            feed = {"inputs_embeds": embeds, "image_start": np.array([image_start], dtype=np.int64)}
            if self.position_scheme != "1d":  # 1-D positions are 0 .. T-1 inside that graph
                feed["position_ids"] = positions
            outputs = self._run("prefill_pruned", feed)
        cache = KVCache.from_outputs(outputs, self.decoder["num_layers"])
        return Prefill(logits=outputs["logits"].reshape(-1, outputs["logits"].shape[-1])[-1], cache=cache,
                       next_position=next_position, kept_image_indices=outputs["kept_image_indices"][0])

    def decode(self, token: int, cache: KVCache, position: int) -> tuple[np.ndarray, KVCache]:
        """One generated token at RoPE position ``position`` -> (next-token logits [V], the grown cache)."""
        positions = np.array([[position]]) if self.position_scheme == "1d" else np.full((3, 1, 1), position)
        logits, cache = self._decode(self.embed(np.array([[token]])), positions, cache)
        return logits[0, -1], cache

    def _decode(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """embeds [1, S, D] at positions [1, S] (M-RoPE [3, 1, S]) over ``cache`` -> (logits [1, S, V], cache + S
        entries per layer)."""
        outputs = self._run("decoder_model_merged", self._decoder_feed(embeds, positions, cache, -1))
        return outputs["logits"], KVCache.from_outputs(outputs, self.decoder["num_layers"])

    def _decoder_feed(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                      image_start: int) -> dict[str, np.ndarray]:
        """decoder_model_merged's inputs; image_start (layer >= 1 graphs only): where this call's N image tokens
        start, -1 for a decoding step."""
        feed = {"inputs_embeds": embeds, "position_ids": positions.astype(np.int64), **cache.feed()}
        if self.decoder["uses_attention_mask"]:
            feed["attention_mask"] = np.ones((1, cache.length(0) + embeds.shape[1]), dtype=np.int64)
        if self._decoder_takes_image_start:
            feed["image_start"] = np.array([image_start], dtype=np.int64)
        return feed

    def _empty_cache(self, dtype: np.dtype) -> KVCache:
        shape = (1, self.decoder["num_key_value_heads"], 0, self.decoder["head_dim"])
        layers = self.decoder["num_layers"]
        return KVCache(keys=[np.zeros(shape, dtype)] * layers, values=[np.zeros(shape, dtype)] * layers)

    # ---- generation -------------------------------------------------------------------------------------------
    def generate_greedy(
        self,
        before: Sequence[int],
        pixel_values: np.ndarray,
        after: Sequence[int],
        max_new_tokens: int,
        *,
        stop_at_eos: bool = True,
    ) -> list[int]:
        """Greedy decoding of up to ``max_new_tokens`` tokens after the prompt ``before + image + after``.

        ``before`` / ``after``: token ids around the image (``runtime.prompt.split_prompt`` cuts them from a processor's
        input_ids); pixel_values [1, C, H, W] as the export's image_preprocessing makes them. Returns the generated
        ids, the EOS that ended generation included (as transformers' ``generate``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_length(len(before) + self.image_placeholders + len(after), max_new_tokens)
        state = self.prefill(before, pixel_values, after)
        logits, cache, position = state.logits, state.cache, state.next_position
        tokens: list[int] = []
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            if len(tokens) == max_new_tokens or (stop_at_eos and token in self.eos_ids):
                return tokens
            logits, cache = self.decode(token, cache, position)
            position += 1

    def _check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        # the prompt fills prompt_length positions; every new token but the last is decoded into one more
        if prompt_length + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(
                f"the prompt ({prompt_length} tokens) plus {max_new_tokens} new tokens exceeds this export's "
                f"max_seq_len={self.max_seq_len}; ask for fewer tokens or re-export with a larger --max-seq-len"
            )

    def preprocess(self, image: Any) -> np.ndarray:
        """An image (path, PIL image or HxWx3 uint8 array) -> pixel_values [1, C, H, W], as the export recorded."""
        from runtime.preprocess import ImagePreprocessing, preprocess

        return preprocess(image, ImagePreprocessing.from_dict(self.config["image_preprocessing"]))
