package dev.vlmpruner.edge.demo

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject
import org.json.JSONTokener

/**
 * `export_config.json`, the file `pruner-export` writes beside `model.pte` (export/common.py builds it).
 *
 * Everything the app needs to run one exported model comes from here: the prompt format, the tokenizer's ids, how
 * many image tokens were kept, and every image preprocessing parameter. Plain Kotlin + org.json, so it runs in JVM
 * unit tests; tests/test_android_demo.py checks the paths below against a real export.
 */
object ConfigPaths {
    const val FORMAT_VERSION = "format_version"
    const val MODEL_ID = "model_id"
    const val TARGET = "target"
    const val PLACEMENT = "placement"
    const val PRUNE_LAYER = "pruner.layer"
    const val PRUNE_METHOD = "pruner.method"
    const val NUM_IMAGE_TOKENS = "num_image_tokens"
    const val KEPT_IMAGE_TOKENS = "kept_image_tokens"
    const val MAX_SEQ_LEN = "max_seq_len"
    const val QUANTIZATION = "quantization"
    const val DTYPE = "dtype"
    const val METHODS = "methods"
    const val IMAGE_PREPROCESSING = "image_preprocessing"
    const val TOKENIZER_FILES = "tokenizer.files"
    const val TOKENIZER_BOS_ID = "tokenizer.bos_id"
    const val TOKENIZER_EOS_IDS = "tokenizer.eos_ids"
    const val TOKENIZER_IMAGE_TOKEN_ID = "tokenizer.image_token_id"
    const val TOKENIZER_PROMPT_FORMAT = "tokenizer.prompt_format"
    const val FILES = "files"
}

/** Paths read when present (an export from another version may lack them; the app falls back as noted). */
object OptionalConfigPaths {
    const val TOKENIZER_RUNNER_FILE = "tokenizer.runner_file" // else the first tokenizer.json / tokenizer.model
    const val PROGRAM_FILE = "executorch.program" // else model.pte
    const val KV_CACHE_HEADS = "executorch.kv_cache.kv_heads" // the three: KV-cache size in the memory estimate
    const val KV_CACHE_HEAD_DIM = "executorch.kv_cache.head_dim"
    const val KV_CACHE_SLOTS = "executorch.kv_cache.slots"
}

/**
 * What the stock ExecuTorch LLM runner (`extension/llm/runner`, behind `LlmModule`) calls in a `.pte`: the methods
 * of `constants.h` and the metadata methods it reads. A layer-0 export has all three methods; a layer K >= 1 export
 * has `prefill` / `decode` instead of `text_decoder` and cannot run here.
 */
object RunnerContract {
    const val VISION_ENCODER = "vision_encoder"
    const val TOKEN_EMBEDDING = "token_embedding"
    const val TEXT_DECODER = "text_decoder"
    const val GET_MAX_SEQ_LEN = "get_max_seq_len"
    const val GET_MAX_CONTEXT_LEN = "get_max_context_len"
    const val GET_BOS_ID = "get_bos_id"
    const val GET_EOS_IDS = "get_eos_ids"
    const val PLACEMENT_BEFORE_LLM = "before_llm"
    const val TARGET_EXECUTORCH = "executorch"
    val METHODS = listOf(VISION_ENCODER, TOKEN_EMBEDDING, TEXT_DECODER)
}

/** The fields of `image_preprocessing` (runtime/preprocess.py's ImagePreprocessing), all required. */
object PreprocessingKeys {
    const val VERSION = "version"
    const val DO_CONVERT_RGB = "do_convert_rgb"
    const val DO_PAD_TO_SQUARE = "do_pad_to_square"
    const val PAD_COLOR = "pad_color"
    const val DO_RESIZE = "do_resize"
    const val SHORTEST_EDGE = "shortest_edge"
    const val HEIGHT = "height"
    const val WIDTH = "width"
    const val RESAMPLE = "resample"
    const val DO_CENTER_CROP = "do_center_crop"
    const val CROP_HEIGHT = "crop_height"
    const val CROP_WIDTH = "crop_width"
    const val DO_RESCALE = "do_rescale"
    const val RESCALE_FACTOR = "rescale_factor"
    const val DO_NORMALIZE = "do_normalize"
    const val IMAGE_MEAN = "image_mean"
    const val IMAGE_STD = "image_std"
    const val INPUT_LAYOUT = "input_layout"
    val ALL = listOf(
        VERSION, DO_CONVERT_RGB, DO_PAD_TO_SQUARE, PAD_COLOR, DO_RESIZE, SHORTEST_EDGE, HEIGHT, WIDTH, RESAMPLE,
        DO_CENTER_CROP, CROP_HEIGHT, CROP_WIDTH, DO_RESCALE, RESCALE_FACTOR, DO_NORMALIZE, IMAGE_MEAN, IMAGE_STD,
        INPUT_LAYOUT
    )
}

/** A problem with an export folder, worded for the user, with the fix. */
class ConfigException(message: String) : Exception(message)

const val SUPPORTED_FORMAT_VERSION = 1
const val SUPPORTED_PREPROCESSING_VERSION = 1
const val CONFIG_FILE_NAME = "export_config.json"
private const val DEFAULT_PROGRAM_FILE = "model.pte"

/** How the vision encoder's input is laid out (runtime/preprocess.py INPUT_LAYOUTS). */
enum class InputLayout(val key: String) {
    FLOAT_NCHW("float_nchw"), // normalised float32, [1, 3, H, W]
    UINT8_CHW("uint8_chw"); // 0-255 pixels, [3, H, W]; the graph normalises inside

    companion object {
        fun of(key: String): InputLayout = values().firstOrNull { it.key == key }
            ?: throw ConfigException(
                "image_preprocessing.input_layout '$key' is unknown to this app (it knows " +
                    values().joinToString { it.key } + "); update the app or re-export"
            )
    }
}

/** PIL's resampling filters by the id Pillow (and transformers) use; the JSON stores the id. */
enum class ResampleFilter(val pilId: Int) {
    NEAREST(0), LANCZOS(1), BILINEAR(2), BICUBIC(3), BOX(4), HAMMING(5);

    companion object {
        fun of(pilId: Int): ResampleFilter = values().firstOrNull { it.pilId == pilId }
            ?: throw ConfigException("image_preprocessing.resample $pilId is not a PIL filter id; re-export the model")
    }
}

/** runtime/preprocess.py's ImagePreprocessing, field for field; the runtime's checks, the same messages' intent. */
class ImagePreprocessing(
    val doConvertRgb: Boolean,
    val doPadToSquare: Boolean,
    val padColor: IntArray,
    val doResize: Boolean,
    val shortestEdge: Int?,
    val height: Int?,
    val width: Int?,
    val resample: ResampleFilter,
    val doCenterCrop: Boolean,
    val cropHeight: Int?,
    val cropWidth: Int?,
    val doRescale: Boolean,
    val rescaleFactor: Double,
    val doNormalize: Boolean,
    val imageMean: DoubleArray,
    val imageStd: DoubleArray,
    val inputLayout: InputLayout
) {
    init {
        if ((height == null) != (width == null)) fail("give both height and width or neither")
        if (shortestEdge != null && height != null) fail("give either shortest_edge or height + width, not both")
        if (doResize && shortestEdge == null && height == null) fail("do_resize needs shortest_edge or height + width")
        if (doCenterCrop && (cropHeight == null || cropWidth == null)) fail("do_center_crop needs crop_height and crop_width")
        if (!(rescaleFactor > 0.0) || rescaleFactor.isInfinite()) fail("rescale_factor must be a finite number > 0")
        if (padColor.size != CHANNELS || padColor.any { it < 0 || it > MAX_BYTE }) fail("pad_color must be 3 ints in 0..255")
        if (imageMean.size != CHANNELS || imageMean.any { it.isNaN() || it.isInfinite() }) fail("image_mean must be 3 numbers")
        if (imageStd.size != CHANNELS || imageStd.any { !(it > 0.0) || it.isInfinite() }) fail("image_std must be 3 numbers > 0")
    }

    /** (height, width) after the resize step for an input of [inHeight] x [inWidth] (after any padding). */
    fun resizedSize(inHeight: Int, inWidth: Int): IntArray {
        if (!doResize) return intArrayOf(inHeight, inWidth)
        if (height != null && width != null) return intArrayOf(height, width)
        val n = shortestEdge!!.toLong()
        // Python: int(n * long / short): an exact product, one correctly rounded division, truncation.
        return if (inWidth <= inHeight) {
            intArrayOf(((n * inHeight).toDouble() / inWidth).toInt(), n.toInt())
        } else {
            intArrayOf(n.toInt(), ((n * inWidth).toDouble() / inHeight).toInt())
        }
    }

    /** (height, width) of the encoder input for an image of [inHeight] x [inWidth]. */
    fun outputSize(inHeight: Int, inWidth: Int): IntArray {
        var h = inHeight
        var w = inWidth
        if (doPadToSquare) {
            h = Math.max(h, w)
            w = h
        }
        if (doCenterCrop) return intArrayOf(cropHeight!!, cropWidth!!)
        return resizedSize(h, w)
    }

    private fun fail(message: String): Nothing = throw ConfigException("image_preprocessing: $message; re-export the model")

    companion object {
        const val CHANNELS = 3
        private const val MAX_BYTE = 255

        fun fromJson(json: JSONObject): ImagePreprocessing {
            val keys = jsonKeys(json)
            val unknown = keys.filter { it !in PreprocessingKeys.ALL }.sorted()
            if (unknown.isNotEmpty()) {
                throw ConfigException(
                    "image_preprocessing has fields this app does not apply ($unknown): its preprocessing would " +
                        "differ from the runtime's; update the app"
                )
            }
            val missing = PreprocessingKeys.ALL.filter { it !in keys }
            if (missing.isNotEmpty()) {
                throw ConfigException("image_preprocessing is missing $missing; re-export the model")
            }
            val version = json.getInt(PreprocessingKeys.VERSION)
            if (version > SUPPORTED_PREPROCESSING_VERSION) {
                throw ConfigException(
                    "image_preprocessing version $version is newer than this app understands " +
                        "($SUPPORTED_PREPROCESSING_VERSION); update the app"
                )
            }
            return ImagePreprocessing(
                doConvertRgb = json.getBoolean(PreprocessingKeys.DO_CONVERT_RGB),
                doPadToSquare = json.getBoolean(PreprocessingKeys.DO_PAD_TO_SQUARE),
                padColor = intList(json.getJSONArray(PreprocessingKeys.PAD_COLOR)).toIntArray(),
                doResize = json.getBoolean(PreprocessingKeys.DO_RESIZE),
                shortestEdge = optInt(json, PreprocessingKeys.SHORTEST_EDGE),
                height = optInt(json, PreprocessingKeys.HEIGHT),
                width = optInt(json, PreprocessingKeys.WIDTH),
                resample = ResampleFilter.of(json.getInt(PreprocessingKeys.RESAMPLE)),
                doCenterCrop = json.getBoolean(PreprocessingKeys.DO_CENTER_CROP),
                cropHeight = optInt(json, PreprocessingKeys.CROP_HEIGHT),
                cropWidth = optInt(json, PreprocessingKeys.CROP_WIDTH),
                doRescale = json.getBoolean(PreprocessingKeys.DO_RESCALE),
                rescaleFactor = json.getDouble(PreprocessingKeys.RESCALE_FACTOR),
                doNormalize = json.getBoolean(PreprocessingKeys.DO_NORMALIZE),
                imageMean = doubleList(json.getJSONArray(PreprocessingKeys.IMAGE_MEAN)).toDoubleArray(),
                imageStd = doubleList(json.getJSONArray(PreprocessingKeys.IMAGE_STD)).toDoubleArray(),
                inputLayout = InputLayout.of(json.getString(PreprocessingKeys.INPUT_LAYOUT))
            )
        }
    }
}

/** One input or output of an exported method: {name, shape, dtype}; a String in the shape is a dynamic dim. */
class TensorSpec(val name: String, val shape: List<Any>, val dtype: String)

class MethodSpec(val inputs: List<TensorSpec>, val outputs: List<TensorSpec>)

class TokenizerInfo(
    val files: List<String>,
    val runnerFile: String,
    val bosId: Int?,
    val eosIds: List<Int>,
    val imageTokenId: Int,
    val promptFormat: String
)

/** Size of the static KV cache the program allocates (executorch.kv_cache), for the memory estimate. */
class KvCacheInfo(val kvHeads: Int, val headDim: Int, val slots: List<Int>)

class ExportConfig(
    val formatVersion: Int,
    val modelId: String,
    val target: String,
    val placement: String,
    val pruneLayer: Int,
    val pruneMethod: String,
    val numImageTokens: Int,
    val keptImageTokens: Int,
    val maxSeqLen: Int,
    val quantization: String,
    val dtype: String,
    val methods: Map<String, MethodSpec>,
    val preprocessing: ImagePreprocessing,
    val tokenizer: TokenizerInfo,
    val programFile: String,
    val files: List<String>,
    val kvCache: KvCacheInfo?
) {
    /** Files the app opens, relative to the folder. */
    val requiredFiles: List<String> get() = listOf(programFile, tokenizer.runnerFile)

    /** Why the stock runner cannot run this export, with the fix; null when it can. */
    fun runnableProblem(): String? {
        if (target != RunnerContract.TARGET_EXECUTORCH) {
            return "This folder holds a '$target' export; the app runs ExecuTorch programs. Export with " +
                "`pruner-export --model <model> --keep <k> --target executorch --prune-layer 0 --android`."
        }
        if (placement != RunnerContract.PLACEMENT_BEFORE_LLM) {
            return "This model prunes inside the LLM (--prune-layer $pruneLayer, placement '$placement'): its " +
                "vision_encoder and text_decoder share state in mutable buffers, and LlmModule (executorch-android " +
                "1.5.1) loads programs without sharing them between methods. Export it again with " +
                "`pruner-export ... --target executorch --prune-layer 0 --android`."
        }
        val missing = RunnerContract.METHODS.filter { it !in methods }
        if (missing.isNotEmpty()) {
            return "The program lacks the methods $missing that the ExecuTorch runner calls; export it again with " +
                "`pruner-export ... --target executorch --prune-layer 0 --android`."
        }
        return encoderInputProblem()
    }

    /** The vision encoder's recorded input must be what the preprocessing produces (size and dtype). */
    private fun encoderInputProblem(): String? {
        val input = methods[RunnerContract.VISION_ENCODER]?.inputs?.firstOrNull() ?: return null
        val expectedDtype = if (preprocessing.inputLayout == InputLayout.FLOAT_NCHW) "float32" else "uint8"
        if (input.dtype != expectedDtype) {
            return "vision_encoder takes ${input.dtype} but image_preprocessing.input_layout is " +
                "'${preprocessing.inputLayout.key}'; the export is inconsistent: export it again."
        }
        val dims = input.shape
        if (preprocessing.doCenterCrop && dims.size >= 2) {
            val h = dims[dims.size - 2]
            val w = dims[dims.size - 1]
            if (h is Int && w is Int && (h != preprocessing.cropHeight || w != preprocessing.cropWidth)) {
                return "vision_encoder takes ${h}x$w images but the preprocessing crops " +
                    "${preprocessing.cropHeight}x${preprocessing.cropWidth}; export the model again."
            }
        }
        return null
    }

    /** Bytes of the static KV cache (keys + values of every layer), or null when the export does not say. */
    fun kvCacheBytes(): Long? {
        val kv = kvCache ?: return null
        val bytesPerValue = when (dtype) {
            "fp32" -> FLOAT32_BYTES
            "fp16", "bf16" -> HALF_BYTES
            else -> return null
        }
        var slots = 0L
        for (s in kv.slots) slots += s
        return KEYS_AND_VALUES * slots * kv.kvHeads * kv.headDim * bytesPerValue
    }

    /** "kept R of N image tokens". */
    val keptLabel: String get() = "kept $keptImageTokens of $numImageTokens image tokens"

    companion object {
        private const val FLOAT32_BYTES = 4L
        private const val HALF_BYTES = 2L
        private const val KEYS_AND_VALUES = 2L
        private val RUNNER_TOKENIZER_SUFFIXES = listOf("tokenizer.json", "tokenizer.model")

        fun parse(text: String): ExportConfig {
            val root = try {
                JSONObject(text)
            } catch (error: JSONException) {
                throw ConfigException("$CONFIG_FILE_NAME is not valid JSON (${error.message}); copy it again")
            }
            try {
                return fromJson(root)
            } catch (error: JSONException) {
                throw ConfigException("$CONFIG_FILE_NAME: ${error.message}; re-export the model")
            }
        }

        private fun fromJson(root: JSONObject): ExportConfig {
            val version = requireInt(root, ConfigPaths.FORMAT_VERSION)
            if (version > SUPPORTED_FORMAT_VERSION) {
                throw ConfigException(
                    "$CONFIG_FILE_NAME uses export format $version, newer than this app understands " +
                        "($SUPPORTED_FORMAT_VERSION); update the app"
                )
            }
            val tokenizerFiles = stringList(requireArray(root, ConfigPaths.TOKENIZER_FILES))
            val runnerFile = (path(root, OptionalConfigPaths.TOKENIZER_RUNNER_FILE) as? String)
                ?: tokenizerFiles.firstOrNull { name -> RUNNER_TOKENIZER_SUFFIXES.any { name.endsWith(it) } }
                ?: throw ConfigException(
                    "$CONFIG_FILE_NAME names no tokenizer.json or tokenizer.model for the runner; re-export the model"
                )
            val tokenizer = TokenizerInfo(
                files = tokenizerFiles,
                runnerFile = runnerFile,
                bosId = path(root, ConfigPaths.TOKENIZER_BOS_ID) as? Int,
                eosIds = intList(requireArray(root, ConfigPaths.TOKENIZER_EOS_IDS)),
                imageTokenId = requireInt(root, ConfigPaths.TOKENIZER_IMAGE_TOKEN_ID),
                promptFormat = requireString(root, ConfigPaths.TOKENIZER_PROMPT_FORMAT)
            )
            val preprocessing = path(root, ConfigPaths.IMAGE_PREPROCESSING) as? JSONObject
                ?: throw missing(ConfigPaths.IMAGE_PREPROCESSING)
            return ExportConfig(
                formatVersion = version,
                modelId = requireString(root, ConfigPaths.MODEL_ID),
                target = requireString(root, ConfigPaths.TARGET),
                placement = requireString(root, ConfigPaths.PLACEMENT),
                pruneLayer = requireInt(root, ConfigPaths.PRUNE_LAYER),
                pruneMethod = requireString(root, ConfigPaths.PRUNE_METHOD),
                numImageTokens = requireInt(root, ConfigPaths.NUM_IMAGE_TOKENS),
                keptImageTokens = requireInt(root, ConfigPaths.KEPT_IMAGE_TOKENS),
                maxSeqLen = requireInt(root, ConfigPaths.MAX_SEQ_LEN),
                quantization = requireString(root, ConfigPaths.QUANTIZATION),
                dtype = requireString(root, ConfigPaths.DTYPE),
                methods = parseMethods(path(root, ConfigPaths.METHODS) as? JSONObject ?: throw missing(ConfigPaths.METHODS)),
                preprocessing = ImagePreprocessing.fromJson(preprocessing),
                tokenizer = tokenizer,
                programFile = (path(root, OptionalConfigPaths.PROGRAM_FILE) as? String) ?: DEFAULT_PROGRAM_FILE,
                files = stringList(requireArray(root, ConfigPaths.FILES)),
                kvCache = parseKvCache(root)
            )
        }

        private fun parseMethods(json: JSONObject): Map<String, MethodSpec> {
            val methods = LinkedHashMap<String, MethodSpec>()
            for (name in jsonKeys(json)) {
                val method = json.getJSONObject(name)
                methods[name] = MethodSpec(specs(method.optJSONArray("inputs")), specs(method.optJSONArray("outputs")))
            }
            return methods
        }

        private fun specs(array: JSONArray?): List<TensorSpec> {
            if (array == null) return emptyList()
            val out = ArrayList<TensorSpec>()
            for (i in 0 until array.length()) {
                val spec = array.getJSONObject(i)
                val shape = spec.getJSONArray("shape")
                val dims = ArrayList<Any>()
                for (d in 0 until shape.length()) dims.add(shape.get(d))
                out.add(TensorSpec(spec.getString("name"), dims, spec.getString("dtype")))
            }
            return out
        }

        private fun parseKvCache(root: JSONObject): KvCacheInfo? {
            val heads = path(root, OptionalConfigPaths.KV_CACHE_HEADS) as? Int ?: return null
            val headDim = path(root, OptionalConfigPaths.KV_CACHE_HEAD_DIM) as? Int ?: return null
            val slots = path(root, OptionalConfigPaths.KV_CACHE_SLOTS) as? JSONArray ?: return null
            return KvCacheInfo(heads, headDim, intList(slots))
        }

        private fun missing(dotted: String) = ConfigException("$CONFIG_FILE_NAME has no '$dotted'; re-export the model")

        private fun requireInt(root: JSONObject, dotted: String): Int = path(root, dotted) as? Int ?: throw missing(dotted)

        private fun requireString(root: JSONObject, dotted: String): String =
            path(root, dotted) as? String ?: throw missing(dotted)

        private fun requireArray(root: JSONObject, dotted: String): JSONArray =
            path(root, dotted) as? JSONArray ?: throw missing(dotted)
    }
}

/** The value at a dotted path ("tokenizer.bos_id"), or null when absent or JSON null. */
fun path(root: JSONObject, dotted: String): Any? {
    var node: Any? = root
    for (part in dotted.split('.')) {
        val obj = node as? JSONObject ?: return null
        node = obj.opt(part) ?: return null
    }
    return if (node == JSONObject.NULL) null else node
}

internal fun jsonKeys(json: JSONObject): List<String> {
    val keys = ArrayList<String>()
    val iterator = json.keys()
    while (iterator.hasNext()) keys.add(iterator.next())
    return keys
}

private fun optInt(json: JSONObject, key: String): Int? = if (json.isNull(key)) null else json.getInt(key)

internal fun intList(array: JSONArray): List<Int> = (0 until array.length()).map { array.getInt(it) }

internal fun doubleList(array: JSONArray): List<Double> = (0 until array.length()).map { array.getDouble(it) }

internal fun stringList(array: JSONArray): List<String> = (0 until array.length()).map { array.getString(it) }

/**
 * The text of added (special) tokens of a Hugging Face `tokenizer.json`, by id: the image placeholder
 * (`image_token_id`) and the end-of-sequence tokens, so the app needs no token text of its own. Parses only the
 * `added_tokens` array (the whole file of a 7B model is a few MB).
 */
object TokenizerJson {
    fun addedTokens(tokenizerJson: String): Map<Int, String> {
        val key = tokenizerJson.indexOf("\"added_tokens\"")
        if (key < 0) return emptyMap()
        val start = tokenizerJson.indexOf('[', key)
        if (start < 0) return emptyMap()
        val array = try {
            JSONTokener(tokenizerJson.substring(start)).nextValue() as? JSONArray ?: return emptyMap()
        } catch (error: JSONException) {
            return emptyMap()
        }
        val tokens = HashMap<Int, String>()
        for (i in 0 until array.length()) {
            val token = array.optJSONObject(i) ?: continue
            if (token.has("id") && token.has("content")) tokens[token.getInt("id")] = token.getString("content")
        }
        return tokens
    }
}
