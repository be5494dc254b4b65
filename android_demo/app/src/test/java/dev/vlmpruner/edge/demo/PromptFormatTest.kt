package dev.vlmpruner.edge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.fail
import org.junit.Test

class PromptFormatTest {
    private val llava = "USER: <image>\n{prompt} ASSISTANT:" // what the exporter writes for LLaVA-1.5

    @Test
    fun splitsAtTheImageTokenText() {
        val parts = PromptFormat.split(llava, "What is this?", "<image>")
        assertEquals("USER: ", parts.beforeImage)
        assertEquals("\nWhat is this? ASSISTANT:", parts.afterImage)
    }

    @Test
    fun splitsAtAnImageField() {
        val parts = PromptFormat.split("{{sys}} USER: {image}\n{prompt} ASSISTANT:", "Hi", "<image>")
        assertEquals("{sys} USER: ", parts.beforeImage)
        assertEquals("\nHi ASSISTANT:", parts.afterImage)
    }

    @Test
    fun theQuestionIsNotSearchedForImageTokens() {
        val parts = PromptFormat.split(llava, "is <image> a tag?", "<image>")
        assertEquals("\nis <image> a tag? ASSISTANT:", parts.afterImage)
    }

    @Test
    fun refusesFormatsWithoutExactlyOneImage() {
        expectError { PromptFormat.split("USER: {prompt} ASSISTANT:", "q", "<image>") }
        expectError { PromptFormat.split("<image><image>{prompt}", "q", "<image>") }
        expectError { PromptFormat.split("USER: <image>\n ASSISTANT:", "q", "<image>") }
        expectError { PromptFormat.split("USER: {image} {other} {prompt}", "q", "<image>") }
        expectError { PromptFormat.split("USER: {image} {prompt", "q", "<image>") }
    }

    @Test(expected = IllegalArgumentException::class)
    fun refusesAnEmptyQuestion() {
        PromptFormat.split(llava, "  ", "<image>")
    }

    private fun expectError(block: () -> Unit) {
        try {
            block()
            fail("expected a ConfigException")
        } catch (expected: ConfigException) {
        }
    }
}
