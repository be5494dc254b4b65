package dev.vlmpruner.edge.demo

import java.io.File

/** One folder holding an export (model.pte, tokenizer, export_config.json), usable or with the reason it is not. */
class ModelFolder(val directory: File, val config: ExportConfig?, val problem: String?) {
    val name: String get() = directory.name
    val usable: Boolean get() = config != null && problem == null

    val programFile: File? get() = config?.let { File(directory, it.programFile) }
    val tokenizerFile: File? get() = config?.let { File(directory, it.tokenizer.runnerFile) }

    /** Bytes of the files the app loads (program + tokenizer). */
    fun sizeBytes(): Long = config?.requiredFiles?.map { File(directory, it).length() }?.fold(0L) { a, b -> a + b } ?: 0L

    /** "keep 64/576 · 8da4w · 3.91 GiB". */
    fun summary(): String {
        val c = config ?: return problem ?: "unreadable"
        return "keep ${c.keptImageTokens}/${c.numImageTokens} · ${c.quantization} · ${gib(sizeBytes())}"
    }
}

/**
 * Finds model folders: every direct subfolder of the given roots that holds export_config.json (the app's files
 * folders and /data/local/tmp/vlm_pruner, where `adb push` puts them).
 */
object ModelLocator {
    /** Where `adb push` puts models (android_demo/android_files.py DEVICE_DIR). */
    const val DEVICE_DIR = "/data/local/tmp/vlm_pruner"

    /** The same folder name under the app's own files folders. */
    const val FILES_SUBDIR = "vlm_pruner"

    fun scan(roots: List<File>): List<ModelFolder> {
        val found = ArrayList<ModelFolder>()
        for (root in roots) {
            val children = root.listFiles() ?: continue // missing, or not listable by the app
            for (dir in children.sortedBy { it.name }) {
                if (dir.isDirectory && File(dir, CONFIG_FILE_NAME).isFile) found.add(inspect(dir))
            }
        }
        return found
    }

    fun inspect(dir: File): ModelFolder {
        val config = try {
            ExportConfig.parse(File(dir, CONFIG_FILE_NAME).readText())
        } catch (error: ConfigException) {
            return ModelFolder(dir, null, error.message)
        } catch (error: java.io.IOException) {
            return ModelFolder(dir, null, "cannot read ${dir.path}/$CONFIG_FILE_NAME (${error.message}); " +
                "make it readable: adb shell chmod -R a+rX ${dir.parent}")
        }
        val problem = config.runnableProblem() ?: missingFiles(dir, config)
        return ModelFolder(dir, config, problem)
    }

    private fun missingFiles(dir: File, config: ExportConfig): String? {
        val missing = config.requiredFiles.filter { !File(dir, it).canRead() }
        if (missing.isEmpty()) return null
        return "${dir.path} lacks (or cannot read) $missing: push the whole folder again and run " +
            "adb shell chmod -R a+rX ${dir.parent}"
    }

    /** The commands that put a prepared folder on the phone, for the "no model found" screen. */
    fun pushCommands(deviceDir: String): String =
        "pruner-export --model llava-1.5-7b --keep 0.11 --target executorch --prune-layer 0 --quantize 8da4w --android\n" +
            "adb shell mkdir -p $deviceDir\n" +
            "adb push exported/llava-1.5-7b-keep0.11-executorch-android $deviceDir/\n" +
            "adb shell chmod -R a+rX $deviceDir"
}
