package dev.vlmpruner.edge.demo

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertNotNull
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class ExportConfigTest {
    @Test
    fun readsALayer0Export() {
        val config = ExportConfig.parse(TestResources.config())
        assertEquals(RunnerContract.PLACEMENT_BEFORE_LLM, config.placement)
        assertEquals(0, config.pruneLayer)
        assertEquals("kept 144 of 576 image tokens", config.keptLabel)
        assertEquals("model.pte", config.programFile)
        assertEquals("tokenizer.json", config.tokenizer.runnerFile)
        assertEquals(1, config.tokenizer.bosId)
        assertEquals(listOf(2), config.tokenizer.eosIds)
        assertEquals(InputLayout.FLOAT_NCHW, config.preprocessing.inputLayout)
        assertEquals(ResampleFilter.BICUBIC, config.preprocessing.resample)
        assertTrue(config.methods.keys.containsAll(RunnerContract.METHODS))
        assertNull(config.runnableProblem())
    }

    @Test
    fun preprocessingNumbersComeFromTheJson() {
        val config = ExportConfig.parse(TestResources.config { json ->
            val spec = json.getJSONObject("image_preprocessing")
            spec.put("shortest_edge", 20).put("crop_height", 18).put("crop_width", 16)
            spec.put("image_mean", JSONArray(listOf(0.1, 0.2, 0.3)))
            json.getJSONObject("methods").getJSONObject("vision_encoder").getJSONArray("inputs").getJSONObject(0)
                .put("shape", JSONArray(listOf(1, 3, 18, 16)))
        })
        val spec = config.preprocessing
        assertEquals(20, spec.shortestEdge)
        assertEquals(0.3, spec.imageMean[2], 0.0)
        assertEquals(listOf(18, 16), spec.outputSize(100, 50).toList())
        assertEquals(listOf(40, 20), spec.resizedSize(100, 50).toList())
        assertEquals(listOf(20, 33), spec.resizedSize(30, 50).toList()) // int(20 * 50 / 30) = 33
        assertNull(config.runnableProblem())
    }

    @Test
    fun refusesAModelPrunedInsideTheLlm() {
        val config = ExportConfig.parse(TestResources.config { json ->
            json.put("placement", "in_llm")
            json.getJSONObject("pruner").put("layer", 2)
            val methods = json.getJSONObject("methods")
            methods.put("prefill", methods.remove("text_decoder"))
        })
        val problem = config.runnableProblem()
        assertNotNull(problem)
        assertTrue(problem!!, problem.contains("--prune-layer 0"))
    }

    @Test
    fun refusesAnOnnxExport() {
        val problem = ExportConfig.parse(TestResources.config { it.put("target", "onnx") }).runnableProblem()
        assertTrue(problem!!, problem.contains("--target executorch"))
    }

    @Test
    fun refusesAnEncoderInputThatDisagreesWithThePreprocessing() {
        val config = ExportConfig.parse(TestResources.config { json ->
            json.getJSONObject("image_preprocessing").put("input_layout", "uint8_chw")
        })
        assertTrue(config.runnableProblem()!!.contains("uint8_chw"))
    }

    @Test
    fun refusesUnknownPreprocessingFieldsAndNewerFormats() {
        expectConfigError("do_sharpen") {
            ExportConfig.parse(TestResources.config { it.getJSONObject("image_preprocessing").put("do_sharpen", true) })
        }
        expectConfigError("update the app") { ExportConfig.parse(TestResources.config { it.put("format_version", 99) }) }
        expectConfigError("tokenizer.prompt_format") {
            ExportConfig.parse(TestResources.config { it.getJSONObject("tokenizer").remove("prompt_format") })
        }
        expectConfigError("not valid JSON") { ExportConfig.parse("{") }
    }

    @Test
    fun kvCacheSizeFromTheExport() {
        val config = ExportConfig.parse(TestResources.config())
        val kv = config.kvCache!!
        var slots = 0L
        for (s in kv.slots) slots += s
        assertEquals(2L * slots * kv.kvHeads * kv.headDim * 4, config.kvCacheBytes())
        val noKv = ExportConfig.parse(TestResources.config { it.getJSONObject("executorch").remove("kv_cache") })
        assertNull(noKv.kvCacheBytes())
    }

    @Test
    fun readsAddedTokensOfATokenizerJson() {
        val tokenizer = JSONObject()
            .put("version", "1.0")
            .put("added_tokens", JSONArray()
                .put(JSONObject().put("id", 2).put("content", "</s>"))
                .put(JSONObject().put("id", 32000).put("content", "<image>")))
            .put("model", JSONObject().put("vocab", JSONObject().put("a", 5)))
        val tokens = TokenizerJson.addedTokens(tokenizer.toString())
        assertEquals("<image>", tokens[32000])
        assertEquals("</s>", tokens[2])
        assertTrue(TokenizerJson.addedTokens("{\"model\": {}}").isEmpty())
    }

    private fun expectConfigError(fragment: String, block: () -> Unit) {
        try {
            block()
            fail("expected a ConfigException mentioning $fragment")
        } catch (error: ConfigException) {
            assertTrue(error.message!!, error.message!!.contains(fragment))
        }
    }
}
