package dev.vlmpruner.edge.demo

import org.json.JSONException
import org.json.JSONObject
import java.util.Locale

/**
 * Keys of the JSON that `LlmCallback.onStats` receives: ExecuTorch's `stats_to_json_string`
 * (extension/llm/runner/stats.h). The runner sets `inference_start_ms` when `generate` starts, so the text after
 * the image is what [RunnerStats.textPrefillMs] times; the image prefill happens before, in `prefillImages`, and the
 * app times it itself. `prefill_token_per_sec` divides every token in the cache by that last prefill only, so the
 * app does not show it.
 */
object StatsKeys {
    const val PROMPT_TOKENS = "prompt_tokens"
    const val GENERATED_TOKENS = "generated_tokens"
    const val INFERENCE_START_MS = "inference_start_ms"
    const val PROMPT_EVAL_END_MS = "prompt_eval_end_ms"
    const val FIRST_TOKEN_MS = "first_token_ms"
    const val INFERENCE_END_MS = "inference_end_ms"
    const val DECODE_TOKEN_PER_SEC = "decode_token_per_sec" // absent when decoding took 0 ms
}

/** One `onStats` report. */
class RunnerStats(
    val promptTokens: Long,
    val generatedTokens: Long,
    val inferenceStartMs: Long,
    val promptEvalEndMs: Long,
    val firstTokenMs: Long,
    val inferenceEndMs: Long,
    val decodeTokensPerSecond: Double?
) {
    /** The text after the image: tokenize + decoder prefill, inside generate(). */
    val textPrefillMs: Long get() = promptEvalEndMs - inferenceStartMs

    companion object {
        private const val MS_PER_S = 1000.0

        fun parse(json: String): RunnerStats {
            val root = try {
                JSONObject(json)
            } catch (error: JSONException) {
                throw IllegalArgumentException("unreadable runner stats: ${error.message}")
            }
            val generated = root.optLong(StatsKeys.GENERATED_TOKENS, 0)
            val evalEnd = root.optLong(StatsKeys.PROMPT_EVAL_END_MS, 0)
            val end = root.optLong(StatsKeys.INFERENCE_END_MS, 0)
            val rate = if (root.has(StatsKeys.DECODE_TOKEN_PER_SEC)) {
                root.getDouble(StatsKeys.DECODE_TOKEN_PER_SEC)
            } else if (end > evalEnd) {
                generated * MS_PER_S / (end - evalEnd)
            } else {
                null
            }
            return RunnerStats(
                promptTokens = root.optLong(StatsKeys.PROMPT_TOKENS, 0),
                generatedTokens = generated,
                inferenceStartMs = root.optLong(StatsKeys.INFERENCE_START_MS, 0),
                promptEvalEndMs = evalEnd,
                firstTokenMs = root.optLong(StatsKeys.FIRST_TOKEN_MS, 0),
                inferenceEndMs = end,
                decodeTokensPerSecond = rate
            )
        }
    }
}

/** Memory of the app's process: PSS now (Debug.getMemoryInfo) and peak RSS (VmHWM), in KiB. */
class MemorySnapshot(val pssKb: Long, val peakRssKb: Long?)

/** Everything measured for one model on one image and prompt. */
class RunMeasurement(
    val modelName: String,
    val keptLabel: String,
    val loadMs: Long,
    val preprocessMs: Long,
    val textBeforeMs: Long,
    val imagePrefillMs: Long,
    val encoderOnlyMs: Long?,
    val timeToFirstTokenMs: Long,
    val runner: RunnerStats?,
    val memory: MemorySnapshot
) {
    fun lines(): List<Pair<String, String>> {
        val out = ArrayList<Pair<String, String>>()
        out.add("image tokens" to keptLabel)
        out.add("model load" to ms(loadMs))
        out.add("preprocess (decode → tensor)" to ms(preprocessMs))
        out.add("image prefill (encoder + pruning + decoder on kept tokens)" to ms(imagePrefillMs))
        if (encoderOnlyMs != null) out.add("vision encoder + pruning alone" to ms(encoderOnlyMs))
        out.add("time to first token (prompt → first token)" to ms(timeToFirstTokenMs))
        val stats = runner
        if (stats != null) {
            out.add("prompt tokens in the cache" to stats.promptTokens.toString())
            out.add("text prefill after the image" to ms(stats.textPrefillMs))
            out.add("decode" to (stats.decodeTokensPerSecond?.let { format("%.1f tok/s", it) } ?: "–") +
                " (${stats.generatedTokens} tokens)")
        }
        out.add("app memory (PSS)" to gib(memory.pssKb * KIB))
        memory.peakRssKb?.let { out.add("peak resident (VmHWM)" to gib(it * KIB)) }
        return out
    }

    companion object {
        const val KIB = 1024L
    }
}

/** B against A: how much faster the pruned model is (ratios > 1 mean B is faster). */
class Comparison(val a: RunMeasurement, val b: RunMeasurement) {
    val ttftSpeedup: Double? get() = ratio(a.timeToFirstTokenMs, b.timeToFirstTokenMs)
    val imagePrefillSpeedup: Double? get() = ratio(a.imagePrefillMs, b.imagePrefillMs)
    val encoderSpeedup: Double?
        get() {
            val slow = a.encoderOnlyMs ?: return null
            val fast = b.encoderOnlyMs ?: return null
            return ratio(slow, fast)
        }
    val decodeRatio: Double?
        get() {
            val slow = a.runner?.decodeTokensPerSecond ?: return null
            val fast = b.runner?.decodeTokensPerSecond ?: return null
            return if (slow > 0) fast / slow else null
        }

    fun lines(): List<Pair<String, String>> {
        val out = ArrayList<Pair<String, String>>()
        out.add("time to first token" to speedup(ttftSpeedup, a.timeToFirstTokenMs, b.timeToFirstTokenMs))
        out.add("image prefill" to speedup(imagePrefillSpeedup, a.imagePrefillMs, b.imagePrefillMs))
        val encoderA = a.encoderOnlyMs
        val encoderB = b.encoderOnlyMs
        if (encoderA != null && encoderB != null) out.add("encoder + pruning" to speedup(encoderSpeedup, encoderA, encoderB))
        decodeRatio?.let { out.add("decode speed" to format("%.2fx", it)) }
        val promptA = a.runner?.promptTokens
        val promptB = b.runner?.promptTokens
        if (promptA != null && promptB != null) out.add("prompt tokens" to "$promptA → $promptB")
        return out
    }

    private fun speedup(value: Double?, slowMs: Long, fastMs: Long): String =
        if (value == null) "–" else format("%.2fx (%s → %s)", value, ms(slowMs), ms(fastMs))

    private fun ratio(slow: Long, fast: Long): Double? = if (fast > 0) slow.toDouble() / fast else null
}

/**
 * RAM a model needs, from its files and export_config.json: the program (weights; XNNPACK keeps a packed copy
 * while the mapped file pages can be dropped), the static KV cache, and the runtime's working memory.
 */
object MemoryEstimate {
    private const val WORKING_FRACTION = 0.10 // activations, XNNPACK scratch, tokenizer, app: measured ~10 %
    private const val BASE_BYTES = 300L * 1024 * 1024 // runtime + app floor

    fun bytesNeeded(programBytes: Long, config: ExportConfig): Long {
        val kv = config.kvCacheBytes() ?: 0L
        return programBytes + kv + (programBytes * WORKING_FRACTION).toLong() + BASE_BYTES
    }
}

/** VmHWM (peak resident set, KiB) from the text of /proc/self/status; null when absent. */
fun peakRssKb(procStatus: String): Long? {
    for (line in procStatus.split('\n')) {
        if (line.startsWith("VmHWM:")) return line.substringAfter(':').trim().split(' ').firstOrNull()?.toLongOrNull()
    }
    return null
}

fun ms(value: Long): String = if (value >= MS_PER_SECOND) format("%.2f s", value / MS_PER_SECOND.toDouble()) else "$value ms"

fun gib(bytes: Long): String = format("%.2f GiB", bytes / GIB)

private const val MS_PER_SECOND = 1000L
private const val GIB = 1024.0 * 1024.0 * 1024.0

internal fun format(pattern: String, vararg args: Any): String = String.format(Locale.ROOT, pattern, *args)
