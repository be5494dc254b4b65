package dev.vlmpruner.edge.demo

import android.app.Application
import android.content.Context
import android.graphics.Bitmap
import android.net.Uri
import androidx.lifecycle.AndroidViewModel
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.update
import java.io.File
import java.io.IOException
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/** A message for the user: what went wrong and what to do; [command] is shown monospace, copyable. */
data class ErrorInfo(val title: String, val message: String, val command: String? = null)

/** One model's answer on screen, streaming while [running]. */
data class RunCard(
    val folder: String,
    val answer: String,
    val running: Boolean,
    val measurement: RunMeasurement? = null,
    val note: String? = null
)

data class UiState(
    val models: List<ModelFolder> = emptyList(),
    val scanned: Boolean = false,
    val modelA: String? = null,
    val modelB: String? = null,
    val compare: Boolean = false,
    val encoderTiming: Boolean = false,
    val preview: Bitmap? = null,
    val question: String = DEFAULT_QUESTION,
    val maxNewTokens: Int = DEFAULT_MAX_NEW_TOKENS,
    val busy: Boolean = false,
    val status: String = "",
    val cards: List<RunCard> = emptyList(),
    val comparison: Comparison? = null,
    val scanError: ErrorInfo? = null,
    val error: ErrorInfo? = null,
    val warning: String? = null
) {
    fun folder(name: String?): ModelFolder? = models.firstOrNull { it.name == name }

    companion object {
        const val DEFAULT_QUESTION = "What is in the picture?"
        const val DEFAULT_MAX_NEW_TOKENS = 64
    }
}

/**
 * The app's state and its one worker thread (LlmModule calls block and run one at a time). Two models are never in
 * memory together: a comparison loads A, runs it, frees it, then does the same with B.
 */
class MainViewModel(application: Application) : AndroidViewModel(application) {
    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state

    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private val prefs = application.getSharedPreferences(PREFS, Context.MODE_PRIVATE)

    @Volatile
    private var session: VlmSession? = null

    @Volatile
    private var image: ArgbSource? = null

    init {
        reportInterruptedLoad()
        rescan()
    }

    // ---- models -------------------------------------------------------------------------------------------------

    fun rescan() = worker.execute {
        val app = getApplication<Application>()
        val roots = listOfNotNull(
            File(app.filesDir, ModelLocator.FILES_SUBDIR),
            app.getExternalFilesDir(null)?.let { File(it, ModelLocator.FILES_SUBDIR) },
            File(ModelLocator.DEVICE_DIR)
        )
        val models = ModelLocator.scan(roots)
        val usable = models.filter { it.usable }
        // A: the model that keeps the most image tokens (the baseline); B: the one that keeps the fewest.
        val byKept = usable.sortedBy { it.config!!.keptImageTokens }
        _state.update { s ->
            s.copy(
                models = models,
                scanned = true,
                modelA = s.modelA?.takeIf { name -> usable.any { it.name == name } } ?: byKept.lastOrNull()?.name,
                modelB = s.modelB?.takeIf { name -> usable.any { it.name == name } } ?: byKept.firstOrNull()?.name,
                scanError = noModelError(models, roots)
            )
        }
    }

    private fun noModelError(models: List<ModelFolder>, roots: List<File>): ErrorInfo? {
        if (models.isEmpty()) {
            return ErrorInfo(
                "No model found",
                "The app looks for folders holding export_config.json in " + roots.joinToString { it.path } +
                    ". Export a model for Android and push it from your computer:",
                ModelLocator.pushCommands(ModelLocator.DEVICE_DIR)
            )
        }
        if (models.none { it.usable }) {
            val first = models.first()
            return ErrorInfo("No runnable model", "${first.name}: ${first.problem}")
        }
        return null
    }

    fun selectA(name: String) = _state.update { it.copy(modelA = name, error = null) }

    fun selectB(name: String) = _state.update { it.copy(modelB = name, error = null) }

    fun setCompare(on: Boolean) = _state.update { it.copy(compare = on) }

    fun setEncoderTiming(on: Boolean) = _state.update { it.copy(encoderTiming = on) }

    fun setQuestion(text: String) = _state.update { it.copy(question = text) }

    fun setMaxNewTokens(value: Int) = _state.update { it.copy(maxNewTokens = value) }

    fun dismissError() = _state.update { it.copy(error = null, warning = null) }

    fun dismissScanError() = _state.update { it.copy(scanError = null) }

    // ---- image --------------------------------------------------------------------------------------------------

    fun setImage(uri: Uri) = worker.execute {
        status("Decoding the image…")
        try {
            val bitmap = AndroidImages.decode(getApplication<Application>().contentResolver, uri)
            useBitmap(bitmap)
        } catch (error: IOException) {
            fail(ErrorInfo("Cannot open the image", error.message ?: uri.toString()))
        } catch (error: OutOfMemoryError) {
            fail(ErrorInfo("Image too large", "Decoding it ran out of Java heap; pick a smaller image."))
        } catch (error: RuntimeException) {
            fail(ErrorInfo("Cannot decode the image", "${error.javaClass.simpleName}: ${error.message}"))
        }
    }

    fun setCameraImage(bitmap: Bitmap) = worker.execute {
        try {
            useBitmap(bitmap)
        } catch (error: OutOfMemoryError) {
            fail(ErrorInfo("Image too large", "Reading it ran out of Java heap."))
        }
    }

    private fun useBitmap(bitmap: Bitmap) {
        image = BitmapSource(bitmap)
        val preview = AndroidImages.preview(bitmap)
        _state.update { it.copy(preview = preview, status = "Image: ${bitmap.width}x${bitmap.height}") }
    }

    // ---- running ------------------------------------------------------------------------------------------------

    fun run() {
        val s = _state.value
        if (s.busy) return
        val source = image
        val folders = listOfNotNull(s.folder(s.modelA), if (s.compare) s.folder(s.modelB) else null)
        val problem = when {
            source == null -> ErrorInfo("No image", "Pick a photo or take a picture first.")
            s.question.isBlank() -> ErrorInfo("No question", "Type a question about the image.")
            folders.isEmpty() -> s.scanError ?: ErrorInfo("No model selected", "Choose a model.")
            s.compare && folders.size < 2 -> ErrorInfo("No second model", "Choose model B, or turn comparison off.")
            else -> folders.firstOrNull { !it.usable }?.let { ErrorInfo("${it.name} cannot run", it.problem ?: "") }
        }
        if (problem != null) return _state.update { it.copy(error = problem) }
        _state.update {
            it.copy(busy = true, error = null, warning = null, comparison = null,
                cards = folders.map { f -> RunCard(f.name, "", running = false) })
        }
        worker.execute {
            val results = ArrayList<RunMeasurement>()
            for ((index, folder) in folders.withIndex()) {
                val measurement = runOne(index, folder, source!!, s.question, s.maxNewTokens, s.encoderTiming) ?: break
                results.add(measurement)
            }
            _state.update {
                it.copy(busy = false, status = if (results.size == folders.size) "Done" else it.status,
                    comparison = if (results.size == 2) Comparison(results[0], results[1]) else null)
            }
        }
    }

    fun stop() {
        session?.stop()
    }

    /** Preprocess, load, generate, measure, free: one model. Null when it failed (the error is on screen). */
    private fun runOne(
        index: Int,
        folder: ModelFolder,
        source: ArgbSource,
        question: String,
        maxNewTokens: Int,
        timeEncoder: Boolean
    ): RunMeasurement? {
        val config = folder.config!!
        val need = MemoryEstimate.bytesNeeded(folder.programFile!!.length(), config)
        val ram = DeviceMemory.device(getApplication<Application>())
        if (need > ram[0]) {
            fail(memoryError(folder, need, ram))
            return null
        }
        if (need > ram[1]) {
            _state.update { it.copy(warning = "${folder.name} needs ≈ ${gib(need)} and ${gib(ram[1])} is free now: " +
                "Android may close other apps, or this one.") }
        }
        card(index) { it.copy(running = true) }
        try {
            status("${folder.name}: preprocessing")
            val preprocessStart = System.nanoTime()
            val input = ImagePreprocessor(config.preprocessing).run(source)
            val preprocessMs = (System.nanoTime() - preprocessStart) / NANOS_PER_MS

            var encoderMs: Long? = null
            if (timeEncoder) {
                status("${folder.name}: timing the vision encoder alone")
                encoderMs = VlmSession.timeEncoder(folder, input)
            }

            status("${folder.name}: loading (${gib(folder.sizeBytes())})")
            prefs.edit().putString(LOADING_FOLDER, folder.directory.path).putLong(LOADING_NEED, need).commit()
            val loadStart = System.nanoTime()
            val loaded = VlmSession.load(folder)
            val loadMs = (System.nanoTime() - loadStart) / NANOS_PER_MS
            prefs.edit().remove(LOADING_FOLDER).remove(LOADING_NEED).apply()
            session = loaded

            val parts = PromptFormat.split(config.tokenizer.promptFormat, question, loaded.imageToken)
            status("${folder.name}: answering")
            val result = loaded.generate(input, parts, maxNewTokens) { piece ->
                card(index) { it.copy(answer = it.answer + piece) }
            }
            val measurement = RunMeasurement(
                modelName = folder.name,
                keptLabel = config.keptLabel,
                loadMs = loadMs,
                preprocessMs = preprocessMs,
                textBeforeMs = result.textBeforeMs,
                imagePrefillMs = result.imagePrefillMs,
                encoderOnlyMs = encoderMs,
                timeToFirstTokenMs = result.timeToFirstTokenMs,
                runner = result.stats,
                memory = DeviceMemory.snapshot()
            )
            card(index) {
                it.copy(running = false, measurement = measurement,
                    note = if (result.stoppedEarly) "stopped after $maxNewTokens pieces" else null)
            }
            return measurement
        } catch (error: RunnerException) {
            prefs.edit().remove(LOADING_FOLDER).remove(LOADING_NEED).apply()
            fail(if (error.memory) memoryError(folder, need, ram) else ErrorInfo("${folder.name} failed", error.message ?: ""))
        } catch (error: OutOfMemoryError) {
            prefs.edit().remove(LOADING_FOLDER).remove(LOADING_NEED).apply()
            fail(memoryError(folder, need, ram))
        } catch (error: ConfigException) {
            fail(ErrorInfo("${folder.name}: unusable export", error.message ?: ""))
        } catch (error: IllegalArgumentException) {
            fail(ErrorInfo("Cannot run", error.message ?: ""))
        } catch (error: IOException) {
            fail(ErrorInfo("${folder.name}: cannot read a file", error.message ?: ""))
        } catch (error: Exception) {
            fail(ErrorInfo("${folder.name} failed", "${error.javaClass.simpleName}: ${error.message}"))
        } finally {
            card(index) { it.copy(running = false) }
            session?.close()
            session = null
        }
        return null
    }

    private fun memoryError(folder: ModelFolder, need: Long, ram: LongArray): ErrorInfo {
        val config = folder.config
        val kv = config?.kvCacheBytes()
        return ErrorInfo(
            "Out of memory",
            "${folder.name} needs about ${gib(need)} of RAM (program ${gib(folder.programFile?.length() ?: 0L)}" +
                (kv?.let { ", KV cache ${gib(it)}" } ?: "") + ", plus working memory); this phone has " +
                "${gib(ram[0])}, ${gib(ram[1])} free now. Close other apps, or export a smaller model: " +
                "--quantize 8da4w, --dtype fp16, or a lower --max-seq-len (a pruned prompt is short)."
        )
    }

    /** A load that never finished last time: Android's low-memory killer ends the process without an exception. */
    private fun reportInterruptedLoad() {
        val path = prefs.getString(LOADING_FOLDER, null) ?: return
        val need = prefs.getLong(LOADING_NEED, 0)
        prefs.edit().remove(LOADING_FOLDER).remove(LOADING_NEED).apply()
        _state.update {
            it.copy(error = ErrorInfo(
                "The last model load did not finish",
                "The app was closed while loading $path, most likely by Android for lack of memory: that model " +
                    "needs about ${gib(need)} of RAM. Close other apps or export a smaller model (--quantize 8da4w, " +
                    "--dtype fp16, a lower --max-seq-len)."
            ))
        }
    }

    private fun card(index: Int, change: (RunCard) -> RunCard) = _state.update { s ->
        if (index >= s.cards.size) s else s.copy(cards = s.cards.mapIndexed { i, c -> if (i == index) change(c) else c })
    }

    private fun status(text: String) = _state.update { it.copy(status = text) }

    private fun fail(error: ErrorInfo) = _state.update { it.copy(error = error, status = error.title) }

    override fun onCleared() {
        session?.stop()
        worker.execute {
            session?.close()
            session = null
        }
        worker.shutdown()
    }

    companion object {
        private const val PREFS = "vlm_pruner_demo"
        private const val LOADING_FOLDER = "loading_folder"
        private const val LOADING_NEED = "loading_need_bytes"
        private const val NANOS_PER_MS = 1_000_000L
    }
}
