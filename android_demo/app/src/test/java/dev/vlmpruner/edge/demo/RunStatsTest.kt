package dev.vlmpruner.edge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test

class RunStatsTest {
    // What ExecuTorch 1.5.1's runner reported for a tiny-llava layer-0 export (keys as in stats.h).
    private val sample = "{\"prefill_token_per_sec\":52000,\"decode_token_per_sec\":1000,\"prompt_tokens\":156," +
        "\"generated_tokens\":7,\"model_load_start_ms\":0,\"model_load_end_ms\":0,\"inference_start_ms\":1795629324826," +
        "\"inference_end_ms\":1795629324836,\"model_execution_start_ms\":0,\"model_execution_end_ms\":0," +
        "\"prompt_eval_end_ms\":1795629324829,\"first_token_ms\":1795629324829,\"aggregate_sampling_time_ms\":0," +
        "\"aggregate_model_execution_time_ms\":0,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}"

    @Test
    fun parsesTheRunnerStats() {
        val stats = RunnerStats.parse(sample)
        assertEquals(156L, stats.promptTokens)
        assertEquals(7L, stats.generatedTokens)
        assertEquals(3L, stats.textPrefillMs)
        assertEquals(1000.0, stats.decodeTokensPerSecond!!, 0.0)
    }

    @Test
    fun decodeRateFallsBackToTheTimestamps() {
        val stats = RunnerStats.parse(
            "{\"generated_tokens\":10,\"prompt_eval_end_ms\":1000,\"inference_end_ms\":3000,\"inference_start_ms\":900}"
        )
        assertEquals(5.0, stats.decodeTokensPerSecond!!, 1e-9)
        assertNull(RunnerStats.parse("{\"generated_tokens\":0}").decodeTokensPerSecond)
    }

    @Test
    fun comparesTwoRuns() {
        val full = measurement("keep1.0", ttft = 14600, image = 12000, stats = sample)
        val pruned = measurement("keep0.11", ttft = 2920, image = 2000, stats = sample.replace("\"prompt_tokens\":156", "\"prompt_tokens\":104"))
        val comparison = Comparison(full, pruned)
        assertEquals(5.0, comparison.ttftSpeedup!!, 1e-9)
        assertEquals(6.0, comparison.imagePrefillSpeedup!!, 1e-9)
        assertEquals(1.0, comparison.decodeRatio!!, 1e-9)
        assertNull(comparison.encoderSpeedup)
        val lines = comparison.lines().toMap()
        assertEquals("156 → 104", lines["prompt tokens"])
        assertTrue(lines["time to first token"]!!.startsWith("5.00x"))
    }

    @Test
    fun readsPeakResidentMemory() {
        assertEquals(5_242_880L, peakRssKb("Name:\tapp\nVmPeak:\t 9000000 kB\nVmHWM:\t 5242880 kB\nVmRSS:\t 1 kB\n"))
        assertNull(peakRssKb("Name:\tapp\n"))
        assertEquals("1.50 s", ms(1500))
        assertEquals("999 ms", ms(999))
    }

    @Test
    fun memoryEstimateAddsTheKvCache() {
        val config = ExportConfig.parse(TestResources.config())
        val program = 1L shl 30
        assertEquals(program + config.kvCacheBytes()!! + program / 10 + 300L * 1024 * 1024,
            MemoryEstimate.bytesNeeded(program, config))
    }

    private fun measurement(name: String, ttft: Long, image: Long, stats: String) = RunMeasurement(
        modelName = name, keptLabel = "", loadMs = 0, preprocessMs = 0, textBeforeMs = 0, imagePrefillMs = image,
        encoderOnlyMs = null, timeToFirstTokenMs = ttft, runner = RunnerStats.parse(stats),
        memory = MemorySnapshot(1, null)
    )
}
