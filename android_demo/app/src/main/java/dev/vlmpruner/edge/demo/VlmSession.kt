package dev.vlmpruner.edge.demo

import org.pytorch.executorch.EValue
import org.pytorch.executorch.ExecutorchRuntimeException
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import org.pytorch.executorch.extension.llm.LlmModuleConfig
import java.io.Closeable
import java.io.IOException

/** What one generation produced: the app's own wall-clock timings and the runner's stats. */
class GenerationResult(
    val textBeforeMs: Long,
    val imagePrefillMs: Long,
    val timeToFirstTokenMs: Long,
    val stats: RunnerStats?,
    val stoppedEarly: Boolean
)

/** The runner refused or failed; [memory] when the error code says it ran out of memory. */
class RunnerException(message: String, val memory: Boolean, cause: Throwable?) : Exception(message, cause)

/**
 * One loaded model: ExecuTorch's `LlmModule` in multimodal mode (MODEL_TYPE_TEXT_VISION), the stock runner.
 *
 * A question runs as the runner expects it: reset the KV cache, prefill the prompt text before the image (with
 * BOS), prefill the image (vision_encoder -> R kept tokens -> text_decoder on them, at consecutive positions),
 * then `generate` the text after the image and stream the answer. Greedy decoding (temperature 0), so two models
 * answer the same question comparably. Calls block: use one background thread.
 */
class VlmSession private constructor(private val folder: ModelFolder, private val module: LlmModule) : Closeable {
    private val config: ExportConfig = folder.config!!
    private val stopTexts: Set<String>

    /** The image placeholder's text (e.g. LLaVA's), read from tokenizer.json by image_token_id. */
    val imageToken: String?

    init {
        val tokens = TokenizerJson.addedTokens(folder.tokenizerFile!!.readText())
        stopTexts = config.tokenizer.eosIds.mapNotNull { tokens[it] }.toSet()
        imageToken = tokens[config.tokenizer.imageTokenId]
    }

    @Volatile
    private var stopRequested = false

    /**
     * Runs [input] and the prompt [parts]; [onToken] receives the answer piece by piece (on this thread). Stops
     * after [maxNewTokens] pieces or on [stop].
     */
    fun generate(input: EncoderInput, parts: PromptParts, maxNewTokens: Int, onToken: (String) -> Unit): GenerationResult {
        stopRequested = false
        var firstTokenAt = 0L
        var pieces = 0
        var runnerStats: RunnerStats? = null
        var failure: String? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                if (firstTokenAt == 0L) firstTokenAt = System.nanoTime()
                if (result in stopTexts) return
                pieces++
                onToken(result)
                if (pieces >= maxNewTokens) {
                    stopRequested = true
                    module.stop()
                }
            }

            override fun onStats(stats: String) {
                statsJson = stats
            }

            override fun onError(errorCode: Int, message: String) {
                failure = "error $errorCode: $message"
            }

            var statsJson: String? = null
        }
        try {
            module.resetContext()
            val start = System.nanoTime()
            if (parts.beforeImage.isNotEmpty()) module.prefillPrompt(parts.beforeImage)
            val afterText = System.nanoTime()
            when (input) {
                is EncoderInput.Normalized -> module.prefillImages(input.values, input.width, input.height, input.channels)
                is EncoderInput.Pixels -> module.prefillImages(input.values, input.width, input.height, input.channels)
            }
            val afterImage = System.nanoTime()
            module.generate(parts.afterImage, config.maxSeqLen, callback, false)
            callback.statsJson?.let { runnerStats = RunnerStats.parse(it) }
            val first = if (firstTokenAt == 0L) System.nanoTime() else firstTokenAt
            return GenerationResult(
                textBeforeMs = millis(afterText - start),
                imagePrefillMs = millis(afterImage - afterText),
                timeToFirstTokenMs = millis(first - start),
                stats = runnerStats,
                stoppedEarly = stopRequested
            )
        } catch (error: ExecutorchRuntimeException) {
            throw RunnerException(
                "The runner failed on ${folder.name}: ${error.message}${failure?.let { " ($it)" } ?: ""}",
                isMemoryError(error.errorCode),
                error
            )
        }
    }

    /** Stops a running [generate] (from any thread); it returns with what it has. */
    fun stop() {
        stopRequested = true
        module.stop()
    }

    override fun close() = module.close()

    companion object {
        private const val NANOS_PER_MS = 1_000_000L

        /** Loads the program and the tokenizer (XNNPACK packs the weights here: the slow, memory-hungry step). */
        fun load(folder: ModelFolder): VlmSession {
            val config = folder.config ?: throw RunnerException(folder.problem ?: "unreadable folder", false, null)
            val moduleConfig = LlmModuleConfig.create()
                .modulePath(folder.programFile!!.absolutePath)
                .tokenizerPath(folder.tokenizerFile!!.absolutePath)
                .modelType(LlmModule.MODEL_TYPE_TEXT_VISION)
                .temperature(0f)
                .numBos(if (config.tokenizer.bosId != null) 1 else 0)
                .loadMode(LlmModuleConfig.LOAD_MODE_MMAP)
                .build()
            val module = try {
                LlmModule(moduleConfig)
            } catch (error: ExecutorchRuntimeException) {
                throw RunnerException("Opening ${folder.name} failed: ${error.message}", isMemoryError(error.errorCode), error)
            }
            try {
                module.load()
                return VlmSession(folder, module)
            } catch (error: ExecutorchRuntimeException) {
                module.close()
                throw RunnerException("Loading ${folder.name} failed: ${error.message}", isMemoryError(error.errorCode), error)
            } catch (error: IOException) {
                module.close()
                throw RunnerException("Cannot read ${folder.tokenizerFile}: ${error.message}", false, error)
            }
        }

        /**
         * Times the vision encoder (with the pruning inside it) alone: loads only that method of the program with
         * ExecuTorch's `Module`, runs it once to warm up and once timed, and frees it. Costs the encoder's weights
         * in RAM while it runs, so call it before [load].
         */
        fun timeEncoder(folder: ModelFolder, input: EncoderInput): Long {
            val config = folder.config!!
            val shape = config.methods[RunnerContract.VISION_ENCODER]?.inputs?.firstOrNull()?.shape
                ?.map { (it as? Int)?.toLong() ?: throw RunnerException("vision_encoder has a dynamic input", false, null) }
                ?.toLongArray()
                ?: throw RunnerException("export_config.json does not describe vision_encoder's input", false, null)
            val tensor = when (input) {
                is EncoderInput.Normalized -> Tensor.fromBlob(input.values, shape)
                is EncoderInput.Pixels -> Tensor.fromBlobUnsigned(ByteArray(input.values.size) { input.values[it].toByte() }, shape)
            }
            val module = Module.load(folder.programFile!!.absolutePath, Module.LOAD_MODE_MMAP)
            try {
                module.loadMethod(RunnerContract.VISION_ENCODER)
                module.execute(RunnerContract.VISION_ENCODER, EValue.from(tensor))
                val start = System.nanoTime()
                module.execute(RunnerContract.VISION_ENCODER, EValue.from(tensor))
                return millis(System.nanoTime() - start)
            } catch (error: ExecutorchRuntimeException) {
                throw RunnerException("Timing ${folder.name}'s vision encoder failed: ${error.message}",
                    isMemoryError(error.errorCode), error)
            } finally {
                module.destroy()
            }
        }

        fun isMemoryError(code: Int): Boolean = code == ExecutorchRuntimeException.MEMORY_ALLOCATION_FAILED ||
            code == ExecutorchRuntimeException.DELEGATE_MEMORY_ALLOCATION_FAILED ||
            code == ExecutorchRuntimeException.OUT_OF_RESOURCES

        private fun millis(nanos: Long): Long = nanos / NANOS_PER_MS
    }
}
