package dev.vlmpruner.edge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import java.io.File

class ModelLocatorTest {
    @get:Rule
    val temp = TemporaryFolder()

    @Test
    fun findsFoldersAndSaysWhatIsWrongWithThem() {
        val root = temp.newFolder("vlm_pruner")
        model(File(root, "b-keep0.11"), TestResources.config())
        model(File(root, "a-layer2"), TestResources.config { it.put("placement", "in_llm") })
        File(root, "c-incomplete").mkdirs()
        File(root, "c-incomplete/$CONFIG_FILE_NAME").writeText(TestResources.config())
        File(root, "not-a-model").mkdirs()

        val found = ModelLocator.scan(listOf(root, File(temp.root, "missing")))
        assertEquals(listOf("a-layer2", "b-keep0.11", "c-incomplete"), found.map { it.name })
        assertFalse(found[0].usable)
        assertTrue(found[0].problem!!.contains("--prune-layer 0"))
        assertTrue(found[1].usable)
        assertTrue(found[1].summary().startsWith("keep 144/576"))
        assertFalse(found[2].usable)
        assertTrue(found[2].problem!!.contains("model.pte"))
    }

    @Test
    fun theNoModelMessageCarriesThePushCommands() {
        val commands = ModelLocator.pushCommands(ModelLocator.DEVICE_DIR)
        assertTrue(commands.contains("--prune-layer 0"))
        assertTrue(commands.contains("adb push"))
        assertTrue(commands.contains(ModelLocator.DEVICE_DIR))
    }

    private fun model(dir: File, config: String) {
        dir.mkdirs()
        File(dir, CONFIG_FILE_NAME).writeText(config)
        File(dir, "model.pte").writeBytes(ByteArray(16))
        File(dir, "tokenizer.json").writeText("{}")
    }
}
